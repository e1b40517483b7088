"""Choose ULD's weight w per request, without the evaluation questions and without a retrained reference.

An ideal erasure makes the forget records look to the served model like records of the same kind it was
never trained on. The statistic compared is a truth ratio built from the training answers alone: for
each record, the length-normalised probability of near-miss answers (one fact span swapped for another
record's, `augment.perturb_answer`) over that of the true answer. On held-out records the *base* model
gives the reference distribution (it never saw them, as a retrained model never saw the forget records);
on the forget records each candidate composite `base + w·assistant` gives one distribution. The chosen w
is the one whose distribution is closest to the reference by the two-sample KS statistic, the same test
TOFU's forget quality applies between a method and its retrain-only oracle.

Ties go to the smaller |w|: subtracting more of the assistant only costs utility.

Measured on the TOFU benchmark's development splits (benchmarks/results/tofu.md, session 4): the chosen w
is one grid step larger in magnitude than the w with the best forget quality (−1.0 vs −0.8 on two dev
authors, −1.1 vs −1.0 on four). The probes' true answers are the exact trained text, which the assistant
remembers more sharply than an evaluation's paraphrase, so a given w looks stronger here than it is
there. It therefore stays an option, not the default.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .augment import donor_pool, near_miss_answers
from .truth_ratio_eval import log_truth_ratios

DEFAULT_WEIGHT_GRID: tuple[float, ...] = (-0.5, -0.6, -0.7, -0.8, -0.9, -1.0, -1.1, -1.25, -1.5, -1.75, -2.0)


@dataclass(frozen=True)
class WeightCalibration:
    weight: float
    ks_statistic: float
    p_value: float
    n_forget: int  # forget records with at least one near-miss answer
    n_holdout: int
    grid: list[dict] = field(default_factory=list)  # per candidate w: ks_statistic, p_value, median_log_ratio

    def as_dict(self) -> dict:
        return {"weight": self.weight, "ks_statistic": self.ks_statistic, "p_value": self.p_value,
                "n_forget": self.n_forget, "n_holdout": self.n_holdout, "grid": list(self.grid)}


def near_miss_probes(records: Sequence, donors: dict[str, list[str]], n_variants: int, seed: int) -> list[dict]:
    """Truth-ratio records built from training answers: the true answer in the paraphrase's place and its
    near-miss answers (`augment.near_miss_answers`) as the perturbed ones; records without a swappable
    fact are skipped."""
    rng = random.Random(seed)
    probes = []
    for record in records:
        wrong = near_miss_answers(record.answer, donors, n_variants, rng)
        if wrong:
            probes.append({"question": record.question, "paraphrased_answer": record.answer, "perturbed_answers": wrong})
    return probes


def closest_weight(reference: Sequence[float], candidates: dict[float, Sequence[float]]
                   ) -> tuple[float, list[dict]]:
    """The candidate w whose log ratios are closest to `reference` (KS statistic; ties → smaller |w|)."""
    from scipy.stats import ks_2samp

    if not reference or not candidates:
        raise ValueError("calibration needs reference ratios and at least one candidate weight")
    grid = []
    for w, ratios in candidates.items():
        test = ks_2samp(list(ratios), list(reference))
        grid.append({"weight": float(w), "ks_statistic": float(test.statistic), "p_value": float(test.pvalue),
                     "median_log_ratio": float(np.median(ratios))})
    best = min(grid, key=lambda g: (round(g["ks_statistic"], 12), abs(g["weight"])))
    return best["weight"], grid


def calibrate_weight(
    base_source,
    composite_at: Callable[[float], object],
    tokenizer,
    fmt,
    forget: Sequence,
    holdout: Sequence,
    donor_texts: Sequence[str],
    grid: Sequence[float] = DEFAULT_WEIGHT_GRID,
    n_variants: int = 2,
    seed: int = 0,
    batch_size: int = 32,
    min_records: int = 5,
) -> WeightCalibration:
    """Pick w from `grid` so the forget records look like `holdout` records did to the base (see module doc).

    `composite_at(w)` returns the served logit source for weight w; `donor_texts` supply the swapped facts
    (answers of retained records, never the forget records' own)."""
    if any(w >= 0 for w in grid):
        raise ValueError(f"ULD weights must be negative, got grid {list(grid)}")
    donors = donor_pool(donor_texts)
    forget_probes = near_miss_probes(forget, donors, n_variants, seed)
    holdout_probes = near_miss_probes(holdout, donors, n_variants, seed)
    if len(forget_probes) < min_records or len(holdout_probes) < min_records:
        raise ValueError(
            f"weight calibration needs ≥ {min_records} forget and held-out records with a swappable fact; "
            f"got {len(forget_probes)} forget, {len(holdout_probes)} held-out")
    reference = log_truth_ratios(base_source, tokenizer, fmt, holdout_probes, batch_size)
    candidates = {w: log_truth_ratios(composite_at(w), tokenizer, fmt, forget_probes, batch_size) for w in grid}
    weight, table = closest_weight(reference, candidates)
    chosen = next(g for g in table if g["weight"] == weight)
    return WeightCalibration(weight=weight, ks_statistic=chosen["ks_statistic"], p_value=chosen["p_value"],
                             n_forget=len(forget_probes), n_holdout=len(holdout_probes), grid=table)
