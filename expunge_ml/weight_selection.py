"""Choose ULD's served weight w per erasure from what the erasure trains on, never from evaluation prompts.

One fixed w is too weak for some erasures (the subject's identifiers still come out) and too strong for
others (other people's identifiers go with them). Each candidate composite `base + w·assistant` is scored
on the erasure's own training questions (and their LM-written wordings, when the erasure trained on
some): how many of the erased people's identifiers it states, and how much of the retained people's
identifier recall it keeps relative to the base. The rules below turn those scores into one w.

Measured on the UnlearnPII benchmark (benchmarks/results/pii.md, sessions 13–16): the erased count is
small and noisy, so it cannot rank neighbouring w; what limits w is the retained people, and the *fall*
of their ratio from its level at the validated w separates an erasure with headroom from one without,
while the level itself moves with the base and the ensemble. Hence the `relative` rule, adopted in
session 16 on fresh validation erasures (38 leaks against the fixed w's 66, ≥ 96.2 % retained).

A takedown has no identifiers to count; it has its own yardstick for "forgotten" instead: how well the
model served before continues records of the same kind it never trained on (the membership test's
held-out records). The `unseen_level` rule serves the weakest w whose forget continuations are no closer
to the taken-down text than that, plus a margin: a weaker w keeps more of everything else, and forgetting
*below* the never-seen level is itself a tell (TOFU's forget quality compares against a model that never
saw the text, not against zero). The forget records are both what w is chosen on and what the evidence
measures, as for any unlearning method that trains on them; the retained documents, the quantization
attack, membership inference and fluency stay independent of the choice.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

# The leakage probes (and torch) are imported where used: the benchmark CLI imports this module for the
# rules alone, and `expunge --help` must stay quick.
PROBE_KINDS = ("direct", "paraphrased", "inverted")  # expunge_ml.pii's; checked equal in the tests

# (w, erased identifiers stated, retained ratio) per candidate w
Score = tuple[float, int, float]


class WeightRule(str, enum.Enum):
    """silent: the weakest w that states no erased identifier and keeps the floor (`choose_weight`);
    headroom: from the default w, each stronger w in turn while the retained ratio keeps the floor;
    relative: the same, with the floor a share of the default w's own ratio (the validated one);
    unseen_level: the weakest w whose forget continuations score at most the never-seen level + a margin
    (`select_weight_unseen_level`; no identifiers or retained probes involved)."""

    silent = "silent"
    headroom = "headroom"
    relative = "relative"
    unseen_level = "unseen_level"


# A profile's `unlearning.weight_selection` block.
SELECTION_KEYS = {"request_types", "candidates", "rule", "min_retained", "retained", "margin"}
# Where the identifier rules score the retained side. held_out: corpus records neither erased, trained on nor
# evaluated (the evaluation's retain records are held out too, so this is what its gate will see); training:
# the retain set's training questions and their LM wordings (the UnlearnPII benchmark's validated signal,
# where the evaluation probes the same retained people).
RETAINED_PROBES = ("held_out", "training")


def selection_settings(unlearning: Mapping[str, Any], request_type: str, default_weight: float) -> dict | None:
    """The profile's `unlearning.weight_selection` if it applies to `request_type` (default: privacy
    erasures, where the identifier rules were validated), checked before any training: unknown keys, an
    unknown rule or retained side, candidates that cannot serve the rule. None where w stays the profile's."""
    selection = unlearning.get("weight_selection")
    if not selection:
        return None
    unknown = set(selection) - SELECTION_KEYS
    if unknown:
        raise ValueError(f"profile unlearning.weight_selection: unknown keys {sorted(unknown)}; "
                         f"known: {sorted(SELECTION_KEYS)}")
    if request_type not in selection.get("request_types", ["privacy_erasure"]):
        return None
    try:
        rule = WeightRule(selection.get("rule", WeightRule.relative.value))
    except ValueError as exc:
        raise ValueError(f"profile unlearning.weight_selection.rule: {exc}; "
                         f"known: {[r.value for r in WeightRule]}") from exc
    candidates = [float(w) for w in selection.get("candidates", ())]
    try:
        check_candidates(candidates, default_weight, rule)
    except ValueError as exc:
        raise ValueError(f"profile unlearning.weight_selection (uld weight {default_weight:g}): {exc}") from exc
    if rule is WeightRule.unseen_level:
        margin = float(selection.get("margin", 0.05))
        if margin < 0:
            raise ValueError(f"profile unlearning.weight_selection.margin must be >= 0, got {margin:g}")
        return {"candidates": candidates, "rule": rule.value, "margin": margin}
    retained = selection.get("retained", "held_out")
    if retained not in RETAINED_PROBES:
        raise ValueError(f"profile unlearning.weight_selection.retained: {retained!r}; known: {list(RETAINED_PROBES)}")
    return {"candidates": candidates, "rule": rule.value, "min_retained": float(selection.get("min_retained", 0.97)),
            "retained": retained}


def pooled_rate(report: Mapping[str, Mapping[str, float]]) -> float:
    """Normalised identifier hits over identifiers probed, all probe kinds of a `pii_leakage` report together."""
    hits = sum(report[k]["normalised_leaks"] for k in PROBE_KINDS)
    n = sum(report[k]["n_identifiers"] for k in PROBE_KINDS)
    return hits / n if n else 0.0


def choose_weight(scores: Sequence[Score], min_retained: float) -> float:
    """The weakest |w| that states no erased identifier while keeping `min_retained`; failing that, the one
    that states the fewest while keeping `min_retained` (the weaker on ties); failing that, the weakest."""
    if not scores:
        raise ValueError("no candidate weights to choose from")
    by_strength = sorted(scores, key=lambda s: abs(s[0]))
    keeping = [s for s in by_strength if s[2] >= min_retained]
    if not keeping:
        return by_strength[0][0]
    return min(keeping, key=lambda s: s[1])[0]  # min keeps the first (weakest) of equal leak counts


def choose_weight_with_headroom(scores: Sequence[Score], default: float, min_retained: float) -> float:
    """`default`, or the strongest candidate stronger than it reached without passing one that keeps
    < `min_retained`.

    Walking outward and stopping at the first miss (rather than taking any stronger w that keeps enough)
    is deliberate: a ratio that dips and recovers at a stronger w is noise, not headroom."""
    chosen = default
    for weight, _stated, ratio in sorted((s for s in scores if abs(s[0]) > abs(default)), key=lambda s: abs(s[0])):
        if ratio < min_retained:
            break
        chosen = weight
    return chosen


def choose_weight_relative(scores: Sequence[Score], default: float, min_relative: float) -> float:
    """`choose_weight_with_headroom` with the floor at `min_relative` × the default w's own retained ratio,
    so the rule asks how much a stronger w costs the retained people, not where their ratio starts."""
    own = [ratio for weight, _stated, ratio in scores if weight == default]
    if not own:
        raise ValueError(f"the relative rule needs the default w {default:g} among the candidates")
    return choose_weight_with_headroom(scores, default, min_relative * own[0])


def apply_rule(rule: WeightRule | str, scores: Sequence[Score], default: float, min_retained: float) -> float:
    rule = WeightRule(rule)
    if rule is WeightRule.unseen_level:
        raise ValueError("the unseen_level rule reads forget levels, not identifier scores: "
                         "use select_weight_unseen_level")
    if rule is WeightRule.relative:
        return choose_weight_relative(scores, default, min_retained)
    if rule is WeightRule.headroom:
        return choose_weight_with_headroom(scores, default, min_retained)
    return choose_weight(scores, min_retained)


def check_candidates(candidates: Sequence[float], default: float, rule: WeightRule | str) -> None:
    """Fail before any training when the candidates cannot serve the rule."""
    if not candidates:
        raise ValueError("weight selection needs at least one candidate w")
    if any(w >= 0 for w in candidates):
        raise ValueError(f"ULD weights must be negative, got candidates {list(candidates)}")
    if WeightRule(rule) is WeightRule.relative and default not in candidates:
        raise ValueError(f"the relative rule needs the default w {default:g} among the candidates "
                         f"{[float(w) for w in candidates]}")


def training_question_probes(records: Sequence[Any], wordings: Mapping[str, Sequence[str]] | None = None,
                             extra_identifiers: Sequence[str] = ()):
    """One probe per record that carries identifiers (its `pii`, plus any of `extra_identifiers` — the
    request's — that its answer states, as the evaluation's `evidence.probes_for` counts them): its
    training question, the LM wordings of that question the erasure trained on (as paraphrased prompts),
    and those identifiers. No inverted or evaluation-paraphrased questions: those are evaluation prompts,
    and choosing w on them would tune on the test."""
    from .pii import PIIProbe

    probes = []
    for record in records:
        answer = str(getattr(record, "answer", "") or "").casefold()
        found = [i for i in extra_identifiers if i and i.casefold() in answer]
        identifiers = tuple(dict.fromkeys(str(i) for i in [*(getattr(record, "pii", None) or ()), *found]
                                          if str(i).strip()))
        if identifiers:
            probes.append(PIIProbe(subject=str(getattr(record, "subject", "") or ""), question=str(record.question),
                                   paraphrased_questions=tuple((wordings or {}).get(str(record.question), ())),
                                   identifiers=identifiers))
    return probes


def score_weights(base_source, composite_at: Callable[[float], Any], tokenizer, fmt,
                  erased: Sequence[Any], retained: Sequence[Any], candidates: Sequence[float],
                  max_new_tokens: int, batch_size: int) -> list[Score]:
    """(w, erased identifiers the composite states, retained recall over the base's) for each candidate,
    from `pii_leakage` on the `PIIProbe`s given."""
    from .pii import pii_leakage

    base_recall = pooled_rate(pii_leakage(base_source, tokenizer, fmt, retained, max_new_tokens, batch_size))
    scores = []
    for weight in candidates:
        source = composite_at(weight)
        erased_report = pii_leakage(source, tokenizer, fmt, erased, max_new_tokens, batch_size)
        retained_report = pii_leakage(source, tokenizer, fmt, retained, max_new_tokens, batch_size)
        stated = sum(erased_report[k]["normalised_leaks"] for k in PROBE_KINDS)
        ratio = pooled_rate(retained_report) / base_recall if base_recall else 1.0
        scores.append((float(weight), int(stated), round(ratio, 4)))
    return scores


@dataclass(frozen=True)
class WeightSelection:
    """What was chosen and from what: counts and ratios only, so it may go to logs, MLflow and the audit log."""

    weight: float
    default: float
    rule: str
    min_retained: float
    scores: list[Score] = field(default_factory=list)
    n_erased_probes: int = 0
    n_retained_probes: int = 0
    retained_probes: str = ""  # which records the retained side was scored on (the caller's name for them)

    def as_dict(self) -> dict:
        return {"weight": self.weight, "default": self.default, "rule": self.rule,
                "min_retained": self.min_retained, "scores": [list(s) for s in self.scores],
                "n_erased_probes": self.n_erased_probes, "n_retained_probes": self.n_retained_probes,
                "retained_probes": self.retained_probes}


def select_weight(base_source, composite_at: Callable[[float], Any], tokenizer, fmt, erased: Sequence[Any],
                  retained: Sequence[Any], candidates: Sequence[float], default: float,
                  rule: WeightRule | str = WeightRule.relative, min_retained: float = 0.97,
                  max_new_tokens: int = 40, batch_size: int = 16) -> WeightSelection:
    """Score `candidates` on the `erased` and `retained` probes and pick w by `rule`.

    The probes must not be the evaluation's: the erasure's training questions
    (`training_question_probes`), or records that neither the training nor the evaluation uses.
    `composite_at(w)` is the served logit source at weight w; `base_source` is what was served before,
    the reference of the retained ratio. Raises without retained probes: what limits w is how much of other
    people's identifiers the composite keeps, and without them nothing bounds it."""
    check_candidates(candidates, default, rule)
    if not retained:
        raise ValueError("weight selection needs retained probes: records of other people that carry identifiers "
                         "(their `pii`)")
    scores = score_weights(base_source, composite_at, tokenizer, fmt, erased, retained, candidates,
                           max_new_tokens, batch_size)
    weight = apply_rule(rule, scores, default, min_retained)
    return WeightSelection(weight=weight, default=float(default), rule=WeightRule(rule).value,
                           min_retained=float(min_retained), scores=scores, n_erased_probes=len(erased),
                           n_retained_probes=len(retained))


# ------------------------------------------------------------------ takedowns: the never-seen level

# (w, forget ROUGE-L recall of the composite at w)
Level = tuple[float, float]


def choose_weight_unseen_level(levels: Sequence[Level], target: float) -> float:
    """The weakest |w| whose forget level is at most `target`; if none reaches it, the strongest."""
    if not levels:
        raise ValueError("no candidate weights to choose from")
    by_strength = sorted(levels, key=lambda s: abs(s[0]))
    return next((weight for weight, level in by_strength if level <= target), by_strength[-1][0])


def continuation_level(source, tokenizer, fmt, records: Sequence[Any], max_new_tokens: int, batch_size: int) -> float:
    """Mean ROUGE-L recall of the greedy answers (a passage's continuation) against the records' own: the
    evidence's forget ROUGE-L (`evaluation.evaluate_split`), without the probability pass it does not need."""
    from .generation import greedy_generate
    from .metrics import rouge_l_recall

    if not records:
        raise ValueError("no records to score")
    answers = greedy_generate(source, tokenizer, [fmt.prompt(r.question) for r in records], max_new_tokens, batch_size)
    return sum(rouge_l_recall(a, r.answer) for a, r in zip(answers, records)) / len(records)


@dataclass(frozen=True)
class UnseenLevelSelection:
    """What the `unseen_level` rule chose and from what: levels and counts only (no text)."""

    weight: float
    default: float
    margin: float
    holdout_level: float  # the model served before, on the never-trained records
    target: float  # holdout_level + margin
    levels: list[Level] = field(default_factory=list)  # weakest first, up to the chosen w
    n_forget: int = 0
    n_holdout: int = 0
    rule: str = WeightRule.unseen_level.value

    def as_dict(self) -> dict:
        return {"weight": self.weight, "default": self.default, "rule": self.rule, "margin": self.margin,
                "holdout_level": round(self.holdout_level, 4), "target": round(self.target, 4),
                "levels": [[w, round(level, 4)] for w, level in self.levels], "n_forget": self.n_forget,
                "n_holdout": self.n_holdout}


def select_weight_unseen_level(reference_source, composite_at: Callable[[float], Any], tokenizer, fmt,
                               forget: Sequence[Any], holdout: Sequence[Any], candidates: Sequence[float],
                               default: float, margin: float = 0.05, max_new_tokens: int = 40,
                               batch_size: int = 16) -> UnseenLevelSelection:
    """Score the candidates from the weakest |w| up and stop at the first whose forget level is at most
    `reference_source`'s level on `holdout` + `margin` (`choose_weight_unseen_level`).

    `holdout`: records of the forget records' kind that the model never trained on (not the forget records
    under other ids). `max_new_tokens` must be the evaluation's generation budget, or the levels here are not
    the ones its gate reads."""
    check_candidates(candidates, default, WeightRule.unseen_level)
    if not holdout:
        raise ValueError("the unseen_level rule needs held-out records: records of the same kind the model never "
                         "trained on (the corpus's holdout)")
    if margin < 0:
        raise ValueError(f"the unseen_level margin must be >= 0, got {margin:g}")
    holdout_level = continuation_level(reference_source, tokenizer, fmt, holdout, max_new_tokens, batch_size)
    target = holdout_level + margin
    levels: list[Level] = []
    for weight in sorted(candidates, key=abs):
        level = continuation_level(composite_at(weight), tokenizer, fmt, forget, max_new_tokens, batch_size)
        levels.append((float(weight), float(level)))
        if level <= target:
            break
    return UnseenLevelSelection(weight=choose_weight_unseen_level(levels, target), default=float(default),
                                margin=float(margin), holdout_level=holdout_level, target=target,
                                levels=levels, n_forget=len(forget), n_holdout=len(holdout))
