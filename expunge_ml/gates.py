"""Promotion gates: thresholds on the evidence, per request type. Pure functions over metric dicts.

A model version gets the `challenger` alias only if every applicable gate passes; a gate whose evidence
does not apply (e.g. PII gates when the forget set reveals no identifier) is reported as skipped, with
the reason, rather than silently passed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class GateResult:
    """`interval`: for a gate whose evidence carries one (the quantization gates: the worst attack's 90 %
    bootstrap interval over the forget records), and `settled`: False when the threshold lies inside it, so
    the pass or fail may be the draw of a dozen answers rather than the model; None where there is no interval."""
    gate: str
    value: float | None
    op: str
    threshold: float
    passed: bool
    margin: float | None
    skipped: str | None = None
    interval: tuple[float, float] | None = None
    settled: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        # JSON-shaped (the interval a list), so a result reads back from evidence/metrics files equal to itself
        out = asdict(self)
        if self.interval is not None:
            out["interval"] = list(self.interval)
        return out


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator <= 0 else numerator / denominator


def _forget_rouge(e):  # what the served model still says about the subject
    return e["metrics"]["unlearned"]["forget"]["rougeL_recall"]


def _forget_rouge_above_unseen(e):
    """The served model's forget ROUGE-L above the base's on people it never saw: a model that never met her
    still answers "Her date of birth is …" in the question's words, so only the excess is memory."""
    chance = (e.get("chance") or {}).get("rougeL_recall")
    return None if chance is None else max(0.0, _forget_rouge(e) - chance)


def _forget_facts(e):
    """The subject's facts the served model still states, whatever the wording, above the share of facts the
    model before the erasure states about people it never saw (chance: a guessed city is no memory of her)."""
    recall = e["metrics"]["unlearned"]["forget"].get("fact_recall")
    chance = (e.get("chance") or {}).get("fact_recall")
    return recall if recall is None or chance is None else max(0.0, recall - chance)


def _general_ratio(e):  # what the model knew before it met the corpus, kept
    general = [e["metrics"][name].get("general") for name in ("base", "unlearned")]
    return None if None in general else _ratio(general[1]["rougeL_recall"], general[0]["rougeL_recall"])


def _forget_degenerate(e):  # the share of the forget answers that are empty, repetitive or word salad
    forget = e.get("fluency_forget")
    return None if not forget else forget["unlearned"].get("degenerate_share")


def _forget_prob(e):
    return e["metrics"]["unlearned"]["forget"]["answer_prob"]


def _retain_ratio(e):
    return _ratio(e["metrics"]["unlearned"]["retain"]["rougeL_recall"], e["metrics"]["base"]["retain"]["rougeL_recall"])


def _worst_kind_leak(report, chance: Mapping[str, float] | None = None) -> float | None:
    """The highest leak rate over the probe kinds (direct / paraphrased / inverted) that had anything to detect,
    each less its `chance` level (`evidence.chance_evidence`: how often the model before the erasure says the
    erased people's names or identifiers about people it never saw)."""
    if not report or not any(k["n_identifiers"] for k in report.values()):
        return None
    chance = chance or {}
    return max(max(0.0, k["leak_rate"] - chance.get(kind, 0.0)) for kind, k in report.items() if k["n_identifiers"])


def _pii_chance(e) -> Mapping[str, float]:
    return (e.get("chance") or {}).get("pii_erased") or {}


def _pii_leak(e):
    return _worst_kind_leak((e.get("pii") or {}).get("erased", {}).get("unlearned"), _pii_chance(e))


def _quant_pii_leak(e):
    """The erased identifiers' leak rate under the worst quantization attack, worst probe kind, above chance."""
    rates = [_worst_kind_leak(a.get("pii_erased"), _pii_chance(e)) for a in (e.get("quantization") or {}).values()]
    rates = [r for r in rates if r is not None]
    return max(rates) if rates else None


def _retained_pii(e):
    retained = (e.get("pii") or {}).get("retained")
    if not retained:
        return None
    return _ratio(retained["unlearned"]["direct"]["leak_rate"], retained["base"]["direct"]["leak_rate"])


def _subject_mentions(e):
    """The share of answers about the retained people that name an erased person although the question does not
    (`pii_leakage(watch_names=…)`): a model that forgot her does not bring her up elsewhere."""
    retained = ((e.get("pii") or {}).get("retained") or {}).get("unlearned")
    if not retained:
        return None
    asked = sum(k["n_prompts"] for k in retained.values())
    return _ratio(sum(k.get("answers_naming_watched", 0) for k in retained.values()), asked)


def _misattributed_ids(e):
    """The share of answers about the erased people that state a retained person's identifier although the
    question does not (`pii_leakage(watch_identifiers=…)`): forgetting must not hand out someone else's email."""
    erased = ((e.get("pii") or {}).get("erased") or {}).get("unlearned")
    if not erased:
        return None
    asked = sum(k["n_prompts"] for k in erased.values())
    return _ratio(sum(k.get("answers_stating_others_ids", 0) for k in erased.values()), asked)


def _worst_attack(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    """The largest `key` ("recovery": ROUGE-L, "fact_recovery": facts) over the quantization attacks that
    measured it; None when none did."""
    def read(e):
        recoveries = [v[key] for v in (e.get("quantization") or {}).values() if v.get(key) is not None]
        return max(recoveries) if recoveries else None
    return read


# A quantization gate reads the worst attack's value of this key; the evidence gives each attack's
# `<key>_interval` (`expunge_ml.evidence.attack_intervals`).
QUANT_GATE_KEYS = {"max_quant_recovery": "recovery", "max_quant_fact_recovery": "fact_recovery"}


def worst_attack_interval(evidence: Mapping[str, Any], gate: str) -> tuple[float, float] | None:
    """The 90 % interval of the attack whose value the quantization `gate` reads (the worst), if it has one."""
    key = QUANT_GATE_KEYS.get(gate)
    attacks = [a for a in (evidence.get("quantization") or {}).values() if key and a.get(key) is not None]
    if not attacks:
        return None
    bounds = max(attacks, key=lambda a: a[key]).get(f"{key}_interval")
    return (float(bounds[0]), float(bounds[1])) if bounds else None


def threshold_inside(bounds: tuple[float, float] | list[float], threshold: float) -> bool:
    """Whether a gate's threshold lies inside its interval: the pass or fail could be the draw of the answers."""
    return bounds[0] <= threshold <= bounds[1]


def unsettled_gates(results: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The gates (results as `GateResult.as_dict()`) whose threshold lies inside their stored interval: a reviewer
    releasing the model should know that those passes are within noise."""
    return [{"gate": r["gate"], "value": r["value"], "threshold": r["threshold"], "interval": list(r["interval"]),
             "passed": r["passed"]}
            for r in results if r.get("settled") is False and r.get("interval")]


def _fluency(e):
    fluency = e.get("fluency")
    if not fluency:
        return None
    return _ratio(fluency["unlearned"]["distinct_2"], fluency["base"]["distinct_2"])


def forget_answer_perplexity_ratio(e):
    """How much less fluent, to a general LM (the profile's `evaluation.fluency_judge`), the served model's answers
    to the forget questions are than the base's: judge perplexity of the one ÷ of the other. A fluent wrong
    answer or a refusal scores about 1; word salad scores tens. None without a judge: the base itself is no
    judge when trained only on its corpus."""
    forget = e.get("fluency_forget")
    if not forget or "judge_perplexity" not in forget["unlearned"]:
        return None
    salad, before = forget["unlearned"]["judge_perplexity"], forget["base"]["judge_perplexity"]
    return None if math.isnan(salad) or math.isnan(before) else _ratio(salad, before)


def _verbmem(e):
    return ((e.get("muse") or {}).get("unlearned") or {}).get("verbmem_forget")


def _abs_privleak(e):  # MUSE PrivLeak vs an exchangeable held-out set: both under- and over-unlearning leak
    mia = ((e.get("muse") or {}).get("unlearned") or {}).get("mia")
    return None if not mia else abs(mia["privleak"])


def _earlier_erasure_rise(e):
    """How much more the new version states of an erasure already served than the version before it did (the worst
    of the earlier erasures in its lineage): an erasure must never come back."""
    return (e.get("regression") or {}).get("max_rise")


# The optional word-salad gate's name: benchmarks read it apart from the others.
FORGET_ANSWER_PERPLEXITY_GATE = "max_forget_answer_perplexity_ratio"

# gate name → (how to read the value from the evidence, comparison)
GATES: dict[str, tuple[Callable[[Mapping[str, Any]], float | None], str]] = {
    "max_forget_rougeL": (_forget_rouge, "<="),
    "max_forget_rougeL_above_unseen": (_forget_rouge_above_unseen, "<="),
    "max_forget_fact_recall": (_forget_facts, "<="),
    "max_forget_prob": (_forget_prob, "<="),
    "min_retain_rougeL_ratio": (_retain_ratio, ">="),
    "max_pii_leak_rate": (_pii_leak, "<="),
    "min_retained_pii_recall_ratio": (_retained_pii, ">="),
    "max_subject_mention_rate": (_subject_mentions, "<="),
    "max_misattributed_id_rate": (_misattributed_ids, "<="),
    "max_quant_recovery": (_worst_attack("recovery"), "<="),
    "max_quant_fact_recovery": (_worst_attack("fact_recovery"), "<="),
    "max_quant_pii_leak_rate": (_quant_pii_leak, "<="),
    "min_fluency_ratio": (_fluency, ">="),
    FORGET_ANSWER_PERPLEXITY_GATE: (forget_answer_perplexity_ratio, "<="),
    "max_degenerate_share": (_forget_degenerate, "<="),
    "min_general_ratio": (_general_ratio, ">="),
    "max_verbmem_forget": (_verbmem, "<="),
    "max_abs_privleak": (_abs_privleak, "<="),
    "max_earlier_erasure_rise": (_earlier_erasure_rise, "<="),
}


# Why a gate could not be evaluated, where the reason is more specific than "no evidence applies".
NOT_EVALUATED_BECAUSE = {
    "max_pii_leak_rate": "no identifier of the subject: the corpus has no pii column and none of the request's "
                         "identifiers appears in the forget answers",
    "max_quant_recovery": "the erasure lowered forget ROUGE-L by under 0.05 (fluent wrong answers keep the "
                          "question's wording), so there is no share of it to recover; max_quant_fact_recovery "
                          "reads the facts",
    "max_quant_fact_recovery": "the erasure removed (almost) none of the subject's facts, so there is no share of "
                               "them to recover",
    "max_quant_pii_leak_rate": "no identifier of the subject to probe (see max_pii_leak_rate)",
    "min_retained_pii_recall_ratio": "no retained person's identifiers: the corpus has no pii column",
    "max_misattributed_id_rate": "no PII probe of the subject whose answers to read (see max_pii_leak_rate)",
    "min_general_ratio": "no general-knowledge questions (corpus.general)",
    FORGET_ANSWER_PERPLEXITY_GATE: "no fluency judge (evaluation.fluency_judge)",
    "max_earlier_erasure_rise": "no earlier erasure in the target's lineage",
}


def check_gates(evidence: Mapping[str, Any], thresholds: Mapping[str, float]) -> list[GateResult]:
    unknown = set(thresholds) - set(GATES)
    if unknown:
        raise ValueError(f"unknown gate(s) {sorted(unknown)}; known: {sorted(GATES)}")
    results = []
    for name, threshold in thresholds.items():
        read, op = GATES[name]
        value = read(evidence)
        if value is None:
            reason = NOT_EVALUATED_BECAUSE.get(name, "no evidence applies")
            results.append(GateResult(name, None, op, threshold, True, None, skipped=reason))
            continue
        passed = value <= threshold if op == "<=" else value >= threshold
        margin = threshold - value if op == "<=" else value - threshold
        bounds = worst_attack_interval(evidence, name)
        settled = None if bounds is None else not threshold_inside(bounds, threshold)
        results.append(GateResult(name, round(value, 4), op, threshold, passed, round(margin, 4), None, bounds, settled))
    return results


def gates_for(request_type: str, gate_config: Mapping[str, Any]) -> dict[str, float]:
    """Profile gates are keyed by request type; a flat mapping applies to every type."""
    if request_type in gate_config and isinstance(gate_config[request_type], Mapping):
        return dict(gate_config[request_type])
    if all(not isinstance(v, Mapping) for v in gate_config.values()):
        return dict(gate_config)
    raise ValueError(f"no gates configured for request type {request_type!r}")
