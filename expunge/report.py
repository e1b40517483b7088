"""Evidence report per ticket: Markdown + JSON + plots an auditor can read without running anything.

Built only from the ticket's work files (ids, counts, hashes, numbers), the request row and the audit
chain head — so the report can be shared without sharing the data the request asked us to erase.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written by workers and CI, never shown on a screen
import matplotlib.pyplot as plt  # noqa: E402

from db import head_hash, requests_repo  # noqa: E402
from expunge.intake import subject_fingerprints  # noqa: E402
from expunge.requests import RequestError, RequestSpec  # noqa: E402
from expunge.settings import Settings  # noqa: E402
from expunge_ml.gates import forget_answer_perplexity_ratio, threshold_inside, worst_attack_interval  # noqa: E402

PROBE_KINDS = ("direct", "paraphrased", "inverted")  # how identifiers are asked for (`expunge_ml.pii`)


def _plot_truth_ratios(evidence: dict, path: Path) -> Path | None:
    ratios = evidence.get("truth_ratios") or {}
    if not any(ratios.get(m, {}).get(s) for m in ("base", "unlearned") for s in ("forget", "retain")):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    bins = [i / 20 for i in range(0, 41)]  # truth ratio 0..2
    for ax, model in zip(axes, ("base", "unlearned")):
        for split, color in (("forget", "tab:red"), ("retain", "tab:blue")):
            values = [min(v, 2.0) for v in ratios.get(model, {}).get(split, [])]
            if values:
                ax.hist(values, bins=bins, alpha=0.6, color=color, label=f"{split} (n={len(values)})")
        ax.set_title(f"{model}: truth ratio P(wrong)/P(paraphrase)")
        ax.set_xlabel("truth ratio (clipped at 2)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("questions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_metric_bars(evidence: dict, path: Path) -> Path:
    names, before, after = [], [], []
    for split in ("forget", "retain"):
        for metric in ("rougeL_recall", "answer_prob", "fact_recall"):
            if evidence["metrics"]["base"][split].get(metric) is None:
                continue
            names.append(f"{split}\n{metric}")
            before.append(evidence["metrics"]["base"][split][metric])
            after.append(evidence["metrics"]["unlearned"][split][metric])
    for kind, stats in ((evidence.get("pii") or {}).get("erased", {}).get("base") or {}).items():
        names.append(f"erased PII\n{kind} leak")
        before.append(stats["leak_rate"])
        after.append(evidence["pii"]["erased"]["unlearned"][kind]["leak_rate"])
    for precision, result in (evidence.get("quantization") or {}).items():
        names.append(f"forget ROUGE-L\n{precision} attack")
        before.append(evidence["metrics"]["base"]["forget"]["rougeL_recall"])
        after.append(result["forget"]["rougeL_recall"])
    muse = evidence.get("muse") or {}
    if muse.get("base", {}).get("verbmem_forget") is not None:
        names.append("forget\nMUSE VerbMem")
        before.append(muse["base"]["verbmem_forget"])
        after.append(muse["unlearned"]["verbmem_forget"])
    if muse.get("base", {}).get("mia"):
        names.append("forget MIA AUC\n(0.5 = unseen)")
        before.append(muse["base"]["mia"]["auc_min_k_pp"])
        after.append(muse["unlearned"]["mia"]["auc_min_k_pp"])
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="before", color="tab:gray")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="after erasure", color="tab:green")
    ax.set_xticks(list(xs), names, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("Before vs after, per metric (forget and leak: lower is better; retain: keep)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach 1.0 anywhere
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _worst_attack_interval(evidence: dict, gate: dict) -> str:
    """For a quantization gate: the 90 % interval of the attack whose recovery the gate read (the worst), and
    whether the threshold lies inside it, so whoever approves sees when a dozen answers cannot settle it."""
    bounds = None if gate.get("skipped") else worst_attack_interval(evidence, gate["gate"])
    if not bounds:
        return ""
    inside = threshold_inside(bounds, gate["threshold"])
    # A pass with the threshold inside is released only with `expunge approve --accept-unsettled`.
    return f"; worst attack's 90 % interval {_fmt(bounds[0])}–{_fmt(bounds[1])}" + (
        (", the threshold inside it: approval needs --accept-unsettled" if gate["passed"] else
         ", the threshold inside it") if inside else "")


def _interval(bounds) -> str:
    """", 90 % interval a–b" for a bootstrap interval over the forget records (`expunge_ml.evidence.recovery_interval`)."""
    return "" if not bounds else f", 90 % interval {_fmt(bounds[0])}–{_fmt(bounds[1])}"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _training_summary(training: dict | None, truth_ratios_computed: bool = True) -> dict | None:
    """Method and where the ULD augmentation came from — counts and settings only, no text."""
    if not training:
        return None
    config = training.get("config") or {}
    summary = {"method": training.get("method"), "forget_pairs": training.get("forget_pairs"),
               "retain_pairs": training.get("retain_pairs")}
    if training.get("adapter_dirs"):  # assistants subtracted from the target: their recipe and served w
        summary["augmentation"] = config.get("augmentation", "corpus")
        # With corpus augmentation the assistant trained on the corpus's paraphrased / perturbed answers,
        # the same texts the truth ratios are computed on: say so next to them (where there are any: a
        # document corpus has no paraphrased / perturbed answers, so no truth ratio to caveat).
        summary["truth_ratio_texts_trained_on"] = truth_ratios_computed and summary["augmentation"] == "corpus" and bool(
            config.get("augment_paraphrased") or config.get("augment_perturbed"))
        if int(config.get("assistants", 1)) > 1:  # an ensemble: each served at w / N
            summary["assistants"] = int(config["assistants"])
        if config.get("fact_span_loss"):  # only the subject's names / identifiers / facts were remembered
            summary["fact_span_loss"] = True
            summary["template_nll_weight"] = config.get("template_nll_weight", 0.0)
        if training.get("weights"):  # what this erasure's assistants are served at, together
            summary["served_weight"] = round(sum(training["weights"]), 6)
        if training.get("weight_selection"):  # w chosen per erasure: counts and ratios only
            summary["weight_selection"] = training["weight_selection"]
    return summary


def _corpus_line(manifests: dict) -> list[str]:
    if manifests.get("corpus_kind") != "documents":
        return []
    return [f"- Corpus: documents, cut into passages of {manifests['passage_words']} words, each prompted with its "
            f"first {manifests['prefix_words']} as written; a record is a passage, and ROUGE-L is of its continuation"]


def _training_lines(summary: dict | None) -> list[str]:
    if not summary:
        return []
    line = f"- Unlearning: `{summary['method']}` on {summary['forget_pairs']} forget / {summary['retain_pairs']} retain training pairs"
    if summary.get("augmentation"):
        line += f", augmentation `{summary['augmentation']}`"
    if summary.get("fact_span_loss"):
        line += (f"; fact-only loss (the assistant remembered the subject's names and identifiers and the facts in "
                 f"the answers, their other words at weight {summary['template_nll_weight']:g})")
    if summary.get("assistants"):
        line += f"; {summary['assistants']} assistants (seeds differ), each subtracted at w / {summary['assistants']}"
    lines = [line]
    if summary.get("served_weight") is not None:
        lines.append(_weight_line(summary["served_weight"], summary.get("weight_selection")))
    if summary.get("truth_ratio_texts_trained_on"):
        lines.append("- Note: the assistant was trained on the corpus's paraphrased / perturbed answers, which the "
                     "truth ratios below are also computed on, so they are not independent evidence "
                     "(`augmentation: generated` avoids this).")
    return lines


def _weight_line(weight: float, selection: dict | None) -> str:
    if not selection:
        return f"- Served at w = {weight:g} (the profile's)"
    floor = f"{selection['min_retained']:g} × the default's own ratio"
    scores = "; ".join(f"{w:g}: {stated}, {ratio:.3f}" for w, stated, ratio in selection["scores"])
    retained = {"held_out": "held-out records that neither the training nor this evaluation uses",
                "training": "the retain set's training questions"}.get(selection.get("retained_probes"), "")
    return (f"- Served at w = {weight:g}, chosen for this erasure by the `relative` rule (profile default "
            f"{selection['default']:g}, retained floor {floor}), scored on the erasure's training questions "
            f"({selection['n_erased_probes']} erased probes) and {retained or 'other records'} "
            f"({selection['n_retained_probes']} retained probes); per candidate w: erased identifiers stated, "
            f"retained recall vs the model served before — {scores}")


def _header_lines(request: dict, manifests: dict, registration: dict | None, audit_head: str,
                  subject_hmacs: dict, training_summary: dict | None) -> list[str]:
    registered = registration or {}
    return [
        f"# Evidence report — ticket {request['ticket_id']}",
        "",
        f"- Request: **{request['type']}** under **{request['regulation']}**, received {request['received_at'][:19]}, due {request['due_at'][:10]}",
        f"- Status: **{request['status']}**" + (f" ({request['reason_code']})" if request.get("reason_code") else ""),
        "- Subject (HMAC-SHA256, keyed): " + "; ".join(f"{k}: {', '.join(h[:16] + '…' for h in v)}" for k, v in subject_hmacs.items()),
        f"- Target model: `{manifests['target_uri']}`",
        *_corpus_line(manifests),
        f"- Forget set: {manifests['forget_count']} records, fingerprint `{manifests['forget_fingerprint']}`",
        f"- Retain set: {manifests['retain_count']} records ({manifests['neighbour_count']} neighbours), fingerprint `{manifests['retain_fingerprint']}`",
        *([f"- Earlier erasures on the target model: {manifests['erased_before_count']} corpus records, left out of the "
           "retain set and of the retained-side evaluation"] if manifests.get("erased_before_count") else []),
        f"- Model version: `{registered.get('model_uri', 'not registered')}`, aliases: {', '.join(registered.get('aliases') or []) or 'none'}",
        f"- Audit chain head at report time: `{audit_head}`",
        *_training_lines(training_summary),
    ]


def _gate_lines(evaluation: dict, evidence: dict) -> list[str]:
    lines = ["## Gates", "", "| gate | value | rule | result |", "|---|---|---|---|"]
    for g in evaluation["gates"]:
        result = "**not evaluated**: " + g["skipped"] if g.get("skipped") else ("pass" if g["passed"] else f"**FAIL** (by {abs(g['margin']):.4f})")
        lines.append(f"| {g['gate']} | {_fmt(g['value'])} | {g['op']} {g['threshold']} | {result}"
                     f"{_worst_attack_interval(evidence, g)} |")
    return lines


def _answer_lines(m: dict, evidence: dict) -> list[str]:
    """ROUGE-L, answer probability and fact recall per split, and the subject's facts in any forget answer."""
    lines = []
    for split in ("forget", "retain"):
        for metric in ("rougeL_recall", "answer_prob"):
            lines.append(f"| {split} (n={m['base'][split]['n']}) | {metric} | {_fmt(m['base'][split][metric])} | {_fmt(m['unlearned'][split][metric])} |")
        if m["base"][split].get("fact_recall") is not None:
            lines.append(f"| {split} (n={m['base'][split]['n']}) | fact_recall ({m['base'][split]['n_facts']} facts) | "
                         f"{_fmt(m['base'][split]['fact_recall'])} | {_fmt(m['unlearned'][split]['fact_recall'])} |")
    anywhere = evidence.get("facts_anywhere")
    if anywhere and anywhere["base"]["n_facts"]:
        # the subject's facts in any forget answer, not only its own question's; the other people's share in the
        # same answers is what word salad states by chance
        def _cell(entry):
            others = entry["others"]
            control = "" if others["rate"] is None else \
                f" (others: {others['stated']} of {others['n_facts']})"
            return f"{entry['stated']} of {entry['n_facts']}{control}"
        lines.append(f"| forget | facts stated in any forget answer (vs {anywhere['base']['others']['n_people']} other "
                     f"people's) | {_cell(anywhere['base'])} | {_cell(anywhere['unlearned'])} |")
    return lines


def _pii_lines(evidence: dict) -> list[str]:
    lines = []
    for group, by_model in (evidence.get("pii") or {}).items():
        for kind in PROBE_KINDS:
            b, a = by_model["base"][kind], by_model["unlearned"][kind]
            revealed = b.get("n_prompt_revealed", 0)
            # Probes whose question spells out the subject's name are not asked (expunge_ml.pii.pii_leakage).
            not_asked = f"; {revealed} not asked: the question spells out the name" if revealed else ""
            if b["n_identifiers"] or revealed:
                lines.append(f"| PII {group} | {kind} leak rate ({b['n_identifiers']} ids{not_asked}) | "
                             f"{_fmt(b['leak_rate'])} | {_fmt(a['leak_rate'])} |")
        asked = sum(by_model["base"][k]["n_prompts"] for k in PROBE_KINDS)
        if group == "erased" and asked:  # other people's identifiers in answers about the erased people
            stating = {model: sum(by_model[model][k].get("answers_stating_others_ids", 0) for k in PROBE_KINDS)
                       for model in ("base", "unlearned")}
            lines.append(f"| PII erased | answers stating a retained person's identifier ({asked} answers) | "
                         f"{stating['base']} | {stating['unlearned']} |")
        if group == "retained" and asked:  # the erased people's names in answers about everyone else
            named = {model: sum(by_model[model][k].get("answers_naming_watched", 0) for k in PROBE_KINDS)
                     for model in ("base", "unlearned")}
            lines.append(f"| PII retained | answers naming an erased person ({asked} answers) | {named['base']} | "
                         f"{named['unlearned']} |")
    return lines


def _quantization_lines(m: dict, evidence: dict) -> list[str]:
    lines = []
    erased_base = ((evidence.get("pii") or {}).get("erased") or {}).get("base")
    for precision, result in (evidence.get("quantization") or {}).items():
        lines.append(f"| forget, {precision} attack | rougeL_recall (recovery {_fmt(result['recovery'])}"
                     f"{_interval(result.get('recovery_interval'))}) | {_fmt(m['base']['forget']['rougeL_recall'])} | "
                     f"{_fmt(result['forget']['rougeL_recall'])} |")
        if result["forget"].get("fact_recall") is not None:
            lines.append(f"| forget, {precision} attack | fact_recall (recovery {_fmt(result.get('fact_recovery'))}"
                         f"{_interval(result.get('fact_recovery_interval'))}) | "
                         f"{_fmt(m['base']['forget']['fact_recall'])} | {_fmt(result['forget']['fact_recall'])} |")
        if result.get("pii_erased") and erased_base:  # the erased identifiers asked again of the quantized copy
            kinds = [k for k in PROBE_KINDS if result["pii_erased"][k]["n_identifiers"]]
            rates = lambda report: " / ".join(_fmt(report[k]["leak_rate"]) for k in kinds)  # noqa: E731
            lines.append(f"| PII erased, {precision} attack | leak rate {' / '.join(kinds)} "
                         f"({sum(result['pii_erased'][k]['n_identifiers'] for k in kinds)} ids) | "
                         f"{rates(erased_base)} | {rates(result['pii_erased'])} |")
    return lines


def _muse_lines(evidence: dict) -> tuple[list[str], list[str]]:
    """MUSE's rows, and the caveats to print under the table."""
    muse = evidence.get("muse") or {}
    if not muse:
        return [], []
    lines, notes = [], []
    for metric, label in (("knowmem_forget", "MUSE KnowMem (ROUGE-L F1)"), ("knowmem_retain", "MUSE KnowMem (ROUGE-L F1)"),
                          ("verbmem_forget", "MUSE VerbMem (ROUGE-L F1)")):
        split = "retain" if metric.endswith("retain") else "forget"
        lines.append(f"| {split} | {label} | {_fmt(muse['base'][metric])} | {_fmt(muse['unlearned'][metric])} |")
    if muse["base"].get("mia"):
        b, a = muse["base"]["mia"], muse["unlearned"]["mia"]
        held = f"{b['n_members']} vs {b['n_holdout']} held-out"
        lines.append(f"| forget | MIA AUC Min-K%++ ({held}) | {_fmt(b['auc_min_k_pp'])} | {_fmt(a['auc_min_k_pp'])} |")
        lines.append(f"| forget | PrivLeak vs 0.5 (0 = like a retrained model) | {_fmt(b['privleak'])} | {_fmt(a['privleak'])} |")
        tpc = b.get("answer_tokens_per_char")
        if tpc and not b.get("tokenisation_matches", True):
            notes.append(f"- Note: the tokenizer splits the held-out answers into {tpc['holdout']:.3f} tokens per "
                         f"character and the forget answers into {tpc['members']:.3f}, so the two sets are not "
                         "exchangeable and PrivLeak's 0.5 reference is unsound: a model that never saw "
                         "the forget set may already tell them apart.")
    return lines, notes


def _fluency_lines(evidence: dict) -> list[str]:
    """How the model writes on neutral prompts, and how it answers the erased subject's questions (word salad there
    passes every leak gate); judge_perplexity only with a profile's `evaluation.fluency_judge`."""
    lines = []
    for key, label in (("fluency", "neutral prompts"), ("fluency_forget", "forget questions")):
        if evidence.get(key):
            for metric in ("distinct_2", "repetition_rate", "reference_perplexity", "judge_perplexity"):
                if metric in evidence[key]["base"]:
                    lines.append(f"| {label} | {metric} | {_fmt(evidence[key]['base'][metric])} | {_fmt(evidence[key]['unlearned'][metric])} |")
    salad = forget_answer_perplexity_ratio(evidence)
    if salad is not None:
        lines.append(f"| forget questions | judge_perplexity, unlearned ÷ base | — | {_fmt(salad)} |")
    return lines


def write_report(out_dir: Path, *, request: dict, manifests: dict, evaluation: dict, evidence: dict,
                 registration: dict | None, audit_head: str, subject_hmacs: dict,
                 training: dict | None = None) -> dict[str, Path]:
    """Write evidence.md, evidence_report.json and the plots into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"bars": _plot_metric_bars(evidence, out_dir / "metrics_before_after.png")}
    truth = _plot_truth_ratios(evidence, out_dir / "truth_ratios.png")
    if truth:
        paths["truth_ratios"] = truth
    summary = {
        "request": request,
        "subject_hmacs": subject_hmacs,
        "manifests": manifests,
        "gates": evaluation["gates"],
        "passed": evaluation["passed"],
        "evidence": {k: v for k, v in evidence.items() if k != "truth_ratios"},
        "registration": registration,
        "training": _training_summary(training, truth_ratios_computed=truth is not None),
        "audit_chain_head": audit_head,
    }
    paths["json"] = out_dir / "evidence_report.json"
    paths["json"].write_text(json.dumps(summary, indent=2, sort_keys=True))
    m = evidence["metrics"]
    muse, notes = _muse_lines(evidence)
    lines = [
        *_header_lines(request, manifests, registration, audit_head, subject_hmacs, summary["training"]), "",
        *_gate_lines(evaluation, evidence),
        "", "## Metrics, before vs after", "", "| split | metric | before | after |", "|---|---|---|---|",
        *_answer_lines(m, evidence), *_pii_lines(evidence), *_quantization_lines(m, evidence), *muse,
        *_fluency_lines(evidence),
        "", *notes, *([""] if notes else []), "## Plots", "", "![before vs after](metrics_before_after.png)", "",
    ]
    if truth:
        lines += ["![truth ratios](truth_ratios.png)", ""]
    lines += ["Identifiers and forget-set text are not in this report: only ids, counts, keyed hashes and numbers."]
    paths["markdown"] = out_dir / "evidence.md"
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def render_report(settings: Settings, ticket_id: str, out_dir: Path | None = None) -> dict[str, Path]:
    """(Re)write a ticket's evidence report from its work files, request row and the audit head."""
    work = settings.ticket_dir(ticket_id)
    needed = [work / name for name in ("resolved.json", "metrics.json", "evidence.json")]
    missing = [p.name for p in needed if not p.exists()]
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None:
            raise RequestError("unknown_ticket", f"no request with ticket id {ticket_id!r}")
        if missing:
            raise RequestError("no_evidence", f"ticket {ticket_id} has no evaluation yet (missing {', '.join(missing)})")
        row = {k: v for k, v in requests_repo.request_row(request).items() if k not in ("history", "metrics")}
        spec = RequestSpec.model_validate_json(request.spec_json)
        audit_head = head_hash(session)
    resolved, evaluation, evidence = (json.loads(p.read_text()) for p in needed)
    return write_report(
        out_dir or work / "report", request=row, manifests=resolved, evaluation=evaluation,
        evidence=evidence, registration=_read_json(work / "registration.json"), audit_head=audit_head,
        subject_hmacs=subject_fingerprints(settings.hmac_key(), spec), training=_read_json(work / "training.json"),
    )
