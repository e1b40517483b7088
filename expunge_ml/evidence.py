"""The evidence behind a release decision: the served model before vs after an erasure.

Computes, on the same questions: forget/retain ROUGE-L and answer probability, TOFU truth ratios,
PII leakage of erased vs retained people (direct, paraphrased, inverted prompts), a quantization
attack (int8/int4 round-to-nearest of every served weight, assistants included, then the forget
metrics and the erased people's PII probes again: unlearning that only hides knowledge behind tiny weight
changes "comes back"), MUSE's
VerbMem / KnowMem / PrivLeak (membership inference against held-out records), and a degeneration check
on neutral prompts. Returns plain dicts of numbers — never generated text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .corpus import QARecord
from .evaluation import SplitMetrics, evaluate_splits, facts_anywhere
from .fluency import FluencyJudge, fluency_of, fluency_report
from .logits import CausalLMLogits, CompositeLogits
from .muse import membership_evidence, verbatim_probes, verbmem
from .pii import PIIProbe, pii_leakage
from .prompting import PromptFormat, encode_answer
from .quantization import nf4_quantized_copy, quantized_copy
from .truth_ratio_eval import truth_ratios

NF4_BLOCKSIZE = 64  # bitsandbytes' NF4 block size as QLoRA deployments use it


@dataclass
class ServedModel:
    """What users get: a base model, optionally with ULD assistants subtracted from its logits."""

    base: torch.nn.Module
    assistants: list[torch.nn.Module] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    relative_top: float = 0.0

    def source(self):
        if not self.assistants:
            return CausalLMLogits(self.base)
        return CompositeLogits(self.base, self.assistants, self.weights, self.relative_top)

    def quantized(self, bits: int, group_size: int | None) -> "ServedModel":
        """Every served weight RTN-quantized: the base and each assistant (LoRA merged first)."""
        return self.transformed(lambda m: quantized_copy(m, bits, group_size))

    def nf4(self, blocksize: int = NF4_BLOCKSIZE) -> "ServedModel":
        """Every served weight NF4-quantized by bitsandbytes (base and merged assistants)."""
        return self.transformed(lambda m: nf4_quantized_copy(m, blocksize))

    def quantization_attacks(self, bits: Sequence[int], group_size: int | None, nf4: bool):
        """(name, group size, build) for each attack: RTN at each bit width, then NF4 if asked; `build()`
        makes the quantized copy only when called, so one copy at a time is alive."""
        attacks = [(f"int{b}", group_size, lambda b=b: self.quantized(b, group_size)) for b in bits]
        if nf4:
            attacks.append(("nf4", NF4_BLOCKSIZE, lambda: self.nf4(NF4_BLOCKSIZE)))
        return attacks

    def transformed(self, fn) -> "ServedModel":
        merged = [merged_copy(a) if hasattr(a, "merge_and_unload") else a for a in self.assistants]
        return ServedModel(fn(self.base), [fn(a) for a in merged], list(self.weights), self.relative_top)


def merged_copy(assistant: torch.nn.Module) -> torch.nn.Module:
    """A PEFT `assistant` with its adapters merged, in a copy: merging writes into the weights of the layers the
    adapters wrap, so only those get storage of their own; the rest stay the assistant's (the base's) tensors."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .modeling import shared_copy

    wrapped = [p for m in assistant.modules() if isinstance(m, BaseTunerLayer) for p in m.get_base_layer().parameters()]
    return shared_copy(assistant, own=wrapped).merge_and_unload()


@dataclass(frozen=True)
class EvidenceOptions:
    # Greedy answers get at least max_new_tokens, and as many more as the longest forget or retain answer
    # needs, up to max_new_tokens_cap (`generation_budget`).
    max_new_tokens: int = 40
    max_new_tokens_cap: int = 256
    batch_size: int = 16
    quant_bits: tuple[int, ...] = (8, 4)
    quant_group_size: int | None = 64
    quant_nf4: bool = True  # also bitsandbytes NF4 (what a 4-bit deployment serves)
    fluency: bool = True
    # A local causal LM that also scores the fluency generations (`fluency.FluencyJudge`); the caller loads it.
    fluency_judge: str | None = None
    verbmem: bool = True
    mia_k: float = 0.2  # Min-K%: share of lowest-scoring tokens averaged

    @classmethod
    def from_profile(cls, config: Mapping[str, Any]) -> "EvidenceOptions":
        """From a profile's `evaluation` section (max_new_tokens and batch_size required, the rest optional)."""
        return cls(
            max_new_tokens=int(config["max_new_tokens"]),
            max_new_tokens_cap=int(config.get("max_new_tokens_cap", 256)),
            batch_size=int(config["batch_size"]),
            quant_bits=tuple(config.get("quant_bits", (8, 4))),
            quant_group_size=config.get("quant_group_size", 64),
            quant_nf4=bool(config.get("quant_nf4", True)),
            fluency=bool(config.get("fluency", True)),
            fluency_judge=config.get("fluency_judge") or None,
            verbmem=bool(config.get("verbmem", True)),
            mia_k=float(config.get("mia_k", 0.2)),
        )


def probes_for(records: Sequence[QARecord], extra_identifiers: Sequence[str] = ()) -> list[PIIProbe]:
    """PII probes from records: identifiers are the record's own `pii`, plus any of `extra_identifiers`
    (the request's) that its answer contains — so user corpora without a `pii` column still get checked."""
    probes = []
    for r in records:
        found = [i for i in extra_identifiers if i and i.casefold() in r.answer.casefold()]
        identifiers = tuple(dict.fromkeys([*r.pii, *found]))
        if not identifiers:
            continue
        probes.append(PIIProbe(
            subject=r.subject,
            question=r.question,
            paraphrased_questions=(r.paraphrased_question,) if r.paraphrased_question else (),
            inverted_question=r.inverted_question or None,
            identifiers=identifiers,
        ))
    return probes


def generation_budget(tokenizer, fmt: PromptFormat, records: Sequence[QARecord], floor: int, cap: int) -> int:
    """New tokens a greedy answer may take: enough for the longest of `records`' answers (its EOS included),
    at least `floor`, at most `cap`.

    Why: ROUGE-L recall against an answer the model had no room to finish is low for every model, so a
    forget gate on it passes on truncation rather than on forgetting (a document passage's continuation is
    often twice a QA answer's budget).
    """
    longest = max((len(encode_answer(tokenizer, fmt, r.answer)) for r in records), default=0)
    return max(floor, min(cap, longest))


def evidence_budget(tokenizer, fmt: PromptFormat, forget: Sequence[QARecord], retain: Sequence[QARecord],
                    options: EvidenceOptions) -> int:
    """The generation budget `collect_evidence` gives every answer for these forget and retain records; a
    choice made on the same records (ULD's served w) generates with it, so it reads what the gates read."""
    return generation_budget(tokenizer, fmt, [*forget, *retain], options.max_new_tokens, options.max_new_tokens_cap)


def recovery(before: float, unlearned: float, attacked: float, min_gap: float = 0.05) -> float | None:
    """Share of the forgotten ROUGE-L (or fact recall) that an attack brings back:
    (attacked − unlearned) / (before − unlearned), clipped to [0, 1]; None when unlearning removed (almost)
    nothing, so there is nothing to recover."""
    gap = before - unlearned
    if gap < min_gap:
        return None
    return min(1.0, max(0.0, (attacked - unlearned) / gap))


def recovery_interval(before: Sequence[float], unlearned: Sequence[float], attacked: Sequence[float],
                      weights: Sequence[float] | None = None, level: float = 0.9, n_boot: int = 2000, seed: int = 0,
                      min_gap: float = 0.05) -> tuple[float, float] | None:
    """A bootstrap interval for `recovery` over the records: resample the records with replacement (the same
    ones for all three models, so the comparison stays paired), take each model's weighted mean over them and
    the recovery of those means, and return the (1 − level) / 2 and (1 + level) / 2 quantiles. `weights`: a
    record's share of the mean (its number of facts for pooled fact recall; None = equal). Resamples whose gap
    (before − unlearned) is under `min_gap` leave recovery undefined and are dropped; None when over half are.
    Why: a request's forget set may be a dozen answers, so one answer moving is a few points of recovery;
    the interval shows an approver how much of a number is that."""
    values = [np.asarray(v, dtype=float) for v in (before, unlearned, attacked)]
    n = len(values[0])
    if n == 0 or any(len(v) != n for v in values):
        raise ValueError("before, unlearned and attacked need one value per record, and at least one record")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=float)
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} records")
    picks = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    picked_weight = w[picks].sum(axis=1)
    defined = picked_weight > 0
    b, u, a = ((v[picks] * w[picks]).sum(axis=1) / np.where(defined, picked_weight, 1.0) for v in values)
    gap = b - u
    defined &= gap >= min_gap
    if defined.sum() * 2 < n_boot:
        return None
    recoveries = np.clip((a[defined] - u[defined]) / gap[defined], 0.0, 1.0)
    low, high = np.quantile(recoveries, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def attack_intervals(before: SplitMetrics, unlearned: SplitMetrics, attacked: SplitMetrics) -> dict[str, Any]:
    """90 % bootstrap intervals over the forget records (`recovery_interval`) for an attack's ROUGE-L recovery
    and, where the answers carry facts, its fact recovery (records weighted by their facts, as the pooled
    fact recall is)."""
    if not before.per_record_rougeL:
        return {}
    intervals: dict[str, Any] = {"recovery_interval": recovery_interval(
        before.per_record_rougeL, unlearned.per_record_rougeL, attacked.per_record_rougeL)}
    if attacked.fact_recall is not None and before.fact_recall is not None:
        def shares(metrics: SplitMetrics) -> list[float]:
            return [stated / total if total else 0.0 for stated, total in metrics.per_record_facts]

        intervals["fact_recovery_interval"] = recovery_interval(
            shares(before), shares(unlearned), shares(attacked), weights=[total for _, total in before.per_record_facts])
    return intervals


def regression_evidence(before: ServedModel, after: ServedModel, tokenizer, fmt: PromptFormat,
                        earlier: Sequence[QARecord], max_new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Whether an erasure already served comes back: the earlier erasures' records (grouped by subject, named only
    by their position) as the model served before (which passed its own gates) and the new one answer them.
    `max_rise`: the largest rise, over the groups, of ROUGE-L recall or fact recall."""
    groups: dict[str, list[QARecord]] = {}
    for record in earlier:
        groups.setdefault(record.subject or "", []).append(record)
    splits = {f"erasure_{i}": records for i, records in enumerate(groups.values())}
    scores = {name: evaluate_splits(served.source(), tokenizer, fmt, splits, max_new_tokens, batch_size)
              for name, served in (("before", before), ("after", after))}
    rows = []
    for split in splits:
        b, a = scores["before"][split], scores["after"][split]
        rises = [a.rougeL_recall - b.rougeL_recall]
        if a.fact_recall is not None and b.fact_recall is not None:
            rises.append(a.fact_recall - b.fact_recall)
        rows.append({"erasure": split, "n": a.n, "rougeL_before": round(b.rougeL_recall, 4),
                     "rougeL_after": round(a.rougeL_recall, 4), "facts_before": b.fact_recall,
                     "facts_after": a.fact_recall, "rise": round(max(rises), 4)})
    return {"n_erasures": len(rows), "n_records": len(earlier), "erasures": rows,
            "max_rise": max((r["rise"] for r in rows), default=None)}


def collect_evidence(
    before: ServedModel,
    after: ServedModel,
    tokenizer,
    fmt: PromptFormat,
    forget: Sequence[QARecord],
    retain: Sequence[QARecord],
    erased_probes: Sequence[PIIProbe] = (),
    retained_probes: Sequence[PIIProbe] = (),
    options: EvidenceOptions = EvidenceOptions(),
    holdout: Sequence[QARecord] = (),
    judge: FluencyJudge | None = None,
    general: Sequence[QARecord] = (),
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """`progress(part, done, total, seconds)` hears of each part as it finishes. `holdout`: records of the same
    kind the model never trained on (membership-inference non-members, and the chance level of the fact and PII gates); without them the MIA/PrivLeak evidence and the chance levels are
    left out. `judge`: a general LM that also scores the fluency generations (without one,
    `max_forget_answer_perplexity_ratio` skips). `general`: questions the pre-trained model answered before it
    met the corpus (`general_knowledge`), for `min_general_ratio`."""
    splits = {"forget": list(forget), "retain": list(retain)}
    budget = evidence_budget(tokenizer, fmt, forget, retain, options)
    kwargs = {"max_new_tokens": budget, "batch_size": options.batch_size}
    models = {"base": before, "unlearned": after}
    evidence: dict[str, Any] = {"metrics": {}, "truth_ratios": {}, "muse": {}, "facts_anywhere": {},
                                "max_new_tokens": budget}
    verbatim = verbatim_probes(forget, fmt) if options.verbmem else []
    forget_results = {}  # per model, the forget split with its per-record scores (for the attacks' intervals)
    seconds = evidence["seconds"] = {}  # where an evaluation's time goes, for whoever sizes it
    clock = time.perf_counter()

    parts = ["splits_base", "splits_unlearned", *(["pii"] if erased_probes or retained_probes else []),
             *(["chance"] if holdout else []), *(["general"] if general else []), "quantization",
             *(["fluency"] if options.fluency else [])]

    def lap(part: str) -> None:
        nonlocal clock
        seconds[part] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        if progress:
            progress(part, len(seconds), len(parts), seconds[part])

    for name, served in models.items():
        forget_results[name] = _model_evidence(evidence, name, served.source(), tokenizer, fmt, splits, verbatim,
                                               holdout, options, kwargs)
        lap(f"splits_{name}")
    erased_ids = {i for probe in erased_probes for i in probe.identifiers}
    others_ids = [i for probe in retained_probes for i in probe.identifiers if i not in erased_ids]
    if erased_probes or retained_probes:
        evidence["pii"] = _pii_evidence(models, tokenizer, fmt, erased_probes, retained_probes, others_ids, kwargs)
        lap("pii")
    if holdout:
        evidence["chance"] = chance_evidence(before.source(), tokenizer, fmt, holdout, erased_probes, kwargs)
        lap("chance")
    if general:
        for name, served in models.items():
            evidence["metrics"][name]["general"] = evaluate_splits(
                served.source(), tokenizer, fmt, {"general": list(general)}, **kwargs)["general"].as_dict()
        lap("general")
    evidence["quantization"] = _quantization_evidence(after, tokenizer, fmt, splits["forget"], evidence["metrics"],
                                                      forget_results, erased_probes, others_ids, options, kwargs)
    lap("quantization")
    if options.fluency:
        evidence.update(_fluency_evidence(models, tokenizer, fmt, splits["forget"], forget_results, options, judge))
        lap("fluency")
    return evidence


def _model_evidence(evidence: dict[str, Any], name: str, source, tokenizer, fmt: PromptFormat,
                    splits: Mapping[str, list[QARecord]], verbatim, holdout: Sequence[QARecord],
                    options: EvidenceOptions, kwargs: Mapping[str, int]):
    """One served model's split metrics, truth ratios, facts anywhere and MUSE numbers, written into
    `evidence` under `name`; returns its forget split with the per-record scores."""
    results = evaluate_splits(source, tokenizer, fmt, splits, **kwargs)
    evidence["facts_anywhere"][name] = facts_anywhere(splits["forget"], results["forget"].answers, splits["retain"])
    evidence["metrics"][name] = m = {k: v.as_dict() for k, v in results.items()}
    evidence["truth_ratios"][name] = {
        split: truth_ratios(source, tokenizer, fmt, [r for r in records if r.paraphrased_answer and r.perturbed_answers],
                            options.batch_size)
        for split, records in splits.items()
    }
    # MUSE: KnowMem (ROUGE-L F1 of the greedy answers above), VerbMem, and PrivLeak when held-out records exist
    evidence["muse"][name] = {
        "knowmem_forget": m["forget"]["rougeL_f1"],
        "knowmem_retain": m["retain"]["rougeL_f1"],
        "verbmem_forget": verbmem(source, tokenizer, verbatim, kwargs["max_new_tokens"], options.batch_size),
        "n_verbmem_probes": len(verbatim),
    }
    if holdout:
        evidence["muse"][name]["mia"] = membership_evidence(source, tokenizer, fmt, splits["forget"], holdout,
                                                            options.mia_k, options.batch_size)
    return results["forget"]


# How far above its level on people it never saw the model must state the forget set, for the erasure to have
# something to remove: the same margin the fact and "above unseen" gates allow after an erasure.
KNOWN_MARGIN = 0.1


def prior_knowledge(source, tokenizer, fmt: PromptFormat, forget: Sequence[QARecord], holdout: Sequence[QARecord],
                    max_new_tokens: int = 40, batch_size: int = 16) -> dict[str, Any]:
    """How much of the forget set the model states before any training: its greedy answers' fact recall (or
    ROUGE-L recall, where the answers carry no facts) on the forget questions against the same on the holdout
    people's questions, whom it never saw. `known` is False when the margin is under KNOWN_MARGIN: there is
    little or nothing to forget, and a forget score of 0 afterwards would prove nothing. Numbers only."""
    splits = {"forget": list(forget), **({"holdout": list(holdout)} if holdout else {})}
    scores = evaluate_splits(source, tokenizer, fmt, splits, max_new_tokens, batch_size)
    facts = scores["forget"].fact_recall is not None and (not holdout or scores["holdout"].fact_recall is not None)
    metric = "fact_recall" if facts else "rougeL_recall"
    result: dict[str, Any] = {"metric": metric, "n_forget": len(forget), "n_holdout": len(holdout),
                              "forget": round(getattr(scores["forget"], metric), 4), "min_margin": KNOWN_MARGIN}
    if not holdout:  # nothing to compare with: measured, not judged
        return {**result, "known": None}
    result["holdout"] = round(getattr(scores["holdout"], metric), 4)
    result["margin"] = round(result["forget"] - result["holdout"], 4)
    return {**result, "known": result["margin"] >= KNOWN_MARGIN}


def chance_evidence(source, tokenizer, fmt: PromptFormat, holdout: Sequence[QARecord],
                    erased_probes: Sequence[PIIProbe], kwargs: Mapping[str, int]) -> dict[str, Any]:
    """What the model before the erasure states about people it never saw (the holdout): the ROUGE-L of its
    answers (a fluent guess repeats the question's wording), the share of their facts it gets right by guessing,
    and per probe kind the share of their PII prompts it answers with an erased
    person's name or identifier. A model that names her for every date of birth, or guesses a common city
    right, shows that as chance, not as memory of her; the fact and PII gates count only what lies above it."""
    unseen = evaluate_splits(source, tokenizer, fmt, {"holdout": list(holdout)}, **kwargs)["holdout"]
    chance: dict[str, Any] = {"n_records": len(holdout), "rougeL_recall": unseen.rougeL_recall,
                              "fact_recall": unseen.fact_recall}
    probes = probes_for(holdout)
    if erased_probes and probes:
        names = [name for probe in erased_probes for name in (probe.subject, *probe.aliases)]
        identifiers = [i for probe in erased_probes for i in probe.identifiers]
        report = pii_leakage(source, tokenizer, fmt, probes, watch_names=names, watch_identifiers=identifiers,
                             **kwargs)
        chance["pii_erased"] = {
            kind: (entry["answers_naming_watched"] if kind == "inverted" else entry["answers_stating_others_ids"])
            / entry["n_prompts"]
            for kind, entry in report.items() if entry["n_prompts"]}
    return chance


def _pii_evidence(models: Mapping[str, ServedModel], tokenizer, fmt: PromptFormat, erased_probes, retained_probes,
                  others_ids: list[str], kwargs: Mapping[str, int]) -> dict[str, Any]:
    """PII leakage per probe group and model. Answers about the retained people are also read for the erased
    people's names, and answers about the erased people for the retained people's identifiers (misattribution)."""
    erased_names = [name for probe in erased_probes for name in (probe.subject, *probe.aliases)]
    pii: dict[str, Any] = {}
    for group, probes in (("erased", erased_probes), ("retained", retained_probes)):
        if probes:
            watch = {"watch_names": erased_names} if group == "retained" else {"watch_identifiers": others_ids}
            pii[group] = {name: pii_leakage(served.source(), tokenizer, fmt, list(probes), **watch, **kwargs)
                          for name, served in models.items()}
    return pii


def _quantization_evidence(after: ServedModel, tokenizer, fmt: PromptFormat, forget: list[QARecord],
                           metrics: Mapping[str, Any], forget_results: Mapping[str, Any], erased_probes,
                           others_ids: list[str], options: EvidenceOptions, kwargs: Mapping[str, int]) -> dict[str, Any]:
    """Per quantization attack on the served model: its forget metrics, the share of the forgotten ROUGE-L and
    facts it brings back (with intervals), and the erased people's PII probes again."""
    forget_before, forget_after = (metrics[name]["forget"] for name in ("base", "unlearned"))
    quantization: dict[str, Any] = {}
    for precision, group_size, build in after.quantization_attacks(options.quant_bits, options.quant_group_size,
                                                                   options.quant_nf4):
        attacked_source = build().source()
        attacked = evaluate_splits(attacked_source, tokenizer, fmt, {"forget": forget}, **kwargs)["forget"]
        quantization[precision] = attack = {
            "forget": attacked.as_dict(),
            "recovery": recovery(forget_before["rougeL_recall"], forget_after["rougeL_recall"], attacked.rougeL_recall),
            # The same share for the facts alone: what an attacker learns back about the subject.
            "fact_recovery": None if attacked.fact_recall is None else recovery(
                forget_before["fact_recall"], forget_after["fact_recall"], attacked.fact_recall),
            **attack_intervals(forget_results["base"], forget_results["unlearned"], attacked),
            "group_size": group_size,
            **({"library": "bitsandbytes"} if precision == "nf4" else {}),
        }
        if erased_probes:
            # What an erasure must keep gone is the identifiers, asked in every wording: a quantized copy that
            # recites an erased email leaks it, whatever its answers' ROUGE-L does (`max_quant_pii_leak_rate`).
            attack["pii_erased"] = pii_leakage(attacked_source, tokenizer, fmt, list(erased_probes),
                                               watch_identifiers=others_ids, **kwargs)
        del attacked_source
    return quantization


def _fluency_evidence(models: Mapping[str, ServedModel], tokenizer, fmt: PromptFormat, forget: list[QARecord],
                      forget_results: Mapping[str, Any], options: EvidenceOptions,
                      judge: FluencyJudge | None) -> dict[str, Any]:
    """Fluency on neutral prompts, and of the answers to the forget questions: a composite can pass every leak
    gate by answering them with word salad, which neutral prompts never show. The forget answers scored are the
    evaluation's own greedy answers (the ones its ROUGE-L and fact recall read)."""
    reference = models["base"].source()
    forget_questions = [record.question for record in forget]
    neutral = {name: fluency_report(served.source(), reference, tokenizer, fmt,
                                    max_new_tokens=options.max_new_tokens, judge=judge)
               for name, served in models.items()}
    # the base's answers are the fluent yardstick the served model's word salad is judged against
    before = fluency_of(forget_results["base"].answers, forget_questions, reference, tokenizer, fmt,
                        options.batch_size, judge)
    after = fluency_of(forget_results["unlearned"].answers, forget_questions, reference, tokenizer, fmt,
                       options.batch_size, judge, fluent_perplexity=before.get("judge_perplexity"))
    return {"fluency": neutral, "fluency_forget": {"base": before, "unlearned": after}}
