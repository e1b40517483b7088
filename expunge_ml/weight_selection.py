"""Choose ULD's served weight w per erasure from what the erasure trains on, never from evaluation prompts.

One fixed w is too weak for some erasures (the subject's identifiers still come out) and too strong for
others (other people's identifiers go with them). Each candidate composite `base + w·assistant` is scored
on the erasure's own training questions (and their LM-written wordings, when the erasure trained on
some): how many of the erased people's identifiers it states, and how much of the retained people's
identifier recall it keeps relative to the base.

The `relative` rule turns those scores into one w: from the default w, each stronger w in turn while the
retained ratio stays above a share of the default's own ratio. The erased count is too small and noisy to
rank neighbouring w; what limits w is how much a stronger w costs the retained people, and the *fall* of
their ratio says that where its level, which moves with the base, does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

# The leakage probes (and torch) are imported where used: the benchmark CLI imports this module for the
# rule alone, and `expunge --help` must stay quick.
PROBE_KINDS = ("direct", "paraphrased", "inverted")  # expunge_ml.pii's; checked equal in the tests

# (w, erased identifiers stated, retained ratio) per candidate w
Score = tuple[float, int, float]

# A profile's `unlearning.weight_selection` block.
SELECTION_KEYS = {"request_types", "candidates", "min_retained", "retained"}
# Where the retained side is scored. held_out: corpus records neither erased, trained on nor evaluated (the
# evaluation's retain records are held out too, so this is what its gate will see); training: the retain set's
# training questions and their LM wordings (for a corpus where the evaluation probes the same retained people).
RETAINED_PROBES = ("held_out", "training")


def selection_settings(unlearning: Mapping[str, Any], request_type: str, default_weight: float) -> dict | None:
    """The profile's `unlearning.weight_selection` if it applies to `request_type` (default: privacy erasures,
    the requests that name identifiers to count), checked before any training: unknown keys, an unknown
    retained side, candidates that cannot serve the rule. None where w stays the profile's."""
    selection = unlearning.get("weight_selection")
    if not selection:
        return None
    unknown = set(selection) - SELECTION_KEYS
    if unknown:
        raise ValueError(f"profile unlearning.weight_selection: unknown keys {sorted(unknown)}; "
                         f"known: {sorted(SELECTION_KEYS)}")
    if request_type not in selection.get("request_types", ["privacy_erasure"]):
        return None
    candidates = [float(w) for w in selection.get("candidates", ())]
    try:
        check_candidates(candidates, default_weight)
    except ValueError as exc:
        raise ValueError(f"profile unlearning.weight_selection (uld weight {default_weight:g}): {exc}") from exc
    retained = selection.get("retained", "held_out")
    if retained not in RETAINED_PROBES:
        raise ValueError(f"profile unlearning.weight_selection.retained: {retained!r}; known: {list(RETAINED_PROBES)}")
    return {"candidates": candidates, "min_retained": float(selection.get("min_retained", 0.97)),
            "retained": retained}


def pooled_rate(report: Mapping[str, Mapping[str, float]]) -> float:
    """Normalised identifier hits over identifiers probed, all probe kinds of a `pii_leakage` report together."""
    hits = sum(report[k]["normalised_leaks"] for k in PROBE_KINDS)
    n = sum(report[k]["n_identifiers"] for k in PROBE_KINDS)
    return hits / n if n else 0.0


def choose_weight_relative(scores: Sequence[Score], default: float, min_relative: float) -> float:
    """`default`, or the strongest candidate stronger than it reached without passing one whose retained ratio
    is under `min_relative` × the default's own ratio.

    Walking outward and stopping at the first miss (rather than taking any stronger w that keeps enough) is
    deliberate: a ratio that dips and recovers at a stronger w is noise, not headroom."""
    own = [ratio for weight, _stated, ratio in scores if weight == default]
    if not own:
        raise ValueError(f"the relative rule needs the default w {default:g} among the candidates")
    floor = min_relative * own[0]
    chosen = default
    for weight, _stated, ratio in sorted((s for s in scores if abs(s[0]) > abs(default)), key=lambda s: abs(s[0])):
        if ratio < floor:
            break
        chosen = weight
    return chosen


def check_candidates(candidates: Sequence[float], default: float) -> None:
    """Fail before any training when the candidates cannot serve the rule."""
    if not candidates:
        raise ValueError("weight selection needs at least one candidate w")
    if any(w >= 0 for w in candidates):
        raise ValueError(f"ULD weights must be negative, got candidates {list(candidates)}")
    if default not in candidates:
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
    min_retained: float
    scores: list[Score] = field(default_factory=list)
    n_erased_probes: int = 0
    n_retained_probes: int = 0
    retained_probes: str = ""  # which records the retained side was scored on (the caller's name for them)

    def as_dict(self) -> dict:
        return {"weight": self.weight, "default": self.default,
                "min_retained": self.min_retained, "scores": [list(s) for s in self.scores],
                "n_erased_probes": self.n_erased_probes, "n_retained_probes": self.n_retained_probes,
                "retained_probes": self.retained_probes}


def select_weight(base_source, composite_at: Callable[[float], Any], tokenizer, fmt, erased: Sequence[Any],
                  retained: Sequence[Any], candidates: Sequence[float], default: float, min_retained: float = 0.97,
                  max_new_tokens: int = 40, batch_size: int = 16) -> WeightSelection:
    """Score `candidates` on the `erased` and `retained` probes and pick w by the relative rule.

    The probes must not be the evaluation's: the erasure's training questions
    (`training_question_probes`), or records that neither the training nor the evaluation uses.
    `composite_at(w)` is the served logit source at weight w; `base_source` is what was served before,
    the reference of the retained ratio. Raises without retained probes: what limits w is how much of other
    people's identifiers the composite keeps, and without them nothing bounds it."""
    check_candidates(candidates, default)
    if not retained:
        raise ValueError("weight selection needs retained probes: records of other people that carry identifiers "
                         "(their `pii`)")
    scores = score_weights(base_source, composite_at, tokenizer, fmt, erased, retained, candidates,
                           max_new_tokens, batch_size)
    weight = choose_weight_relative(scores, default, min_retained)
    return WeightSelection(weight=weight, default=float(default), min_retained=float(min_retained), scores=scores,
                           n_erased_probes=len(erased), n_retained_probes=len(retained))
