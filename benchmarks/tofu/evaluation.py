"""TOFU's numbers for one model: forget truth ratios, ROUGE-L and probability, and the 9 utility numbers."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from expunge_ml.corpus import QARecord
from expunge_ml.tofu import option_probability, utility_keys

from .options import TofuBenchOptions
from .plan import Plan


def _scores(source, tokenizer, fmt, pairs, batch_size) -> list[float]:
    """Mean (per-token) log-prob of each answer given its question."""
    from expunge_ml.generation import score_answers

    return [s.mean_log_prob for s in score_answers(source, tokenizer, fmt, pairs, batch_size)]


def _rouge(source, tokenizer, fmt, records: Sequence[QARecord], opts: TofuBenchOptions) -> float:
    from expunge_ml.generation import greedy_generate
    from expunge_ml.metrics import rouge_l_recall

    outputs = greedy_generate(source, tokenizer, [fmt.prompt(r.question) for r in records],
                              opts.max_new_tokens, opts.eval_batch_size)
    return float(np.mean([rouge_l_recall(o, r.answer) for o, r in zip(outputs, records)]))


def _scored_options(source, tokenizer, fmt, records: Sequence[QARecord], opts: TofuBenchOptions,
                    with_paraphrase: bool) -> tuple[list[float], list[tuple[int, int]]]:
    """Log-probs of each record's answer [, paraphrased answer] and perturbed answers, scored in one flat list,
    and each record's span in it."""
    pairs, spans = [], []
    for r in records:
        start = len(pairs)
        pairs.append((r.question, r.answer))
        if with_paraphrase:
            pairs.append((r.question, r.paraphrased_answer))
        pairs += [(r.question, p) for p in r.perturbed_answers]
        spans.append((start, len(pairs)))
    return _scores(source, tokenizer, fmt, pairs, opts.eval_batch_size), spans


def _utility_numbers(source, tokenizer, fmt, plan: Plan, opts: TofuBenchOptions) -> dict[str, float]:
    from expunge_ml.metrics import retain_truth_ratio_score, truth_ratio

    numbers: dict[str, float] = {}
    # retain: P(answer) (length-normalised), ROUGE-L recall, mean(max(0, 1 − R)) with paraphrased vs perturbed
    lp, spans = _scored_options(source, tokenizer, fmt, plan.retain_eval, opts, with_paraphrase=True)
    numbers["retain_prob"] = float(np.mean([np.exp(lp[s]) for s, _ in spans]))
    numbers["retain_rougeL"] = _rouge(source, tokenizer, fmt, plan.retain_eval, opts)
    numbers["retain_truth_ratio"] = retain_truth_ratio_score([truth_ratio(lp[s + 1], lp[s + 2:e]) for s, e in spans])
    # real authors / world facts: P(correct) normalised over the options, ROUGE-L recall, 1 − R vs the answer
    for name, records in (("real_authors", plan.real_eval), ("world_facts", plan.world_eval)):
        lp, spans = _scored_options(source, tokenizer, fmt, records, opts, with_paraphrase=False)
        numbers[f"{name}_prob"] = float(np.mean([option_probability(lp[s], lp[s + 1:e]) for s, e in spans]))
        numbers[f"{name}_rougeL"] = _rouge(source, tokenizer, fmt, records, opts)
        numbers[f"{name}_truth_ratio"] = retain_truth_ratio_score([truth_ratio(lp[s], lp[s + 1:e]) for s, e in spans])
    return {k: numbers[k] for k in utility_keys()}


def evaluate_source(source, tokenizer, fmt, forget: Sequence[QARecord], plan: Plan, opts: TofuBenchOptions,
                    utility_cache: dict | None = None) -> dict:
    """TOFU numbers of one logit source. `utility_cache`: where a model evaluated on several splits keeps its
    utility numbers, which do not depend on the split."""
    from expunge_ml.metrics import forget_truth_ratio_score, harmonic_mean, truth_ratio

    out: dict[str, Any] = {}
    lp, spans = _scored_options(source, tokenizer, fmt, forget, opts, with_paraphrase=True)
    ratios = [truth_ratio(lp[s + 1], lp[s + 2:e]) for s, e in spans]
    out["forget_truth_ratios"] = ratios
    out["forget_truth_ratio_score"] = forget_truth_ratio_score(ratios)
    out["forget_prob"] = float(np.mean([np.exp(lp[s]) for s, _ in spans]))
    out["forget_rougeL"] = _rouge(source, tokenizer, fmt, forget, opts)
    if utility_cache is not None and "numbers" in utility_cache:
        out["utility"] = dict(utility_cache["numbers"])
    else:
        out["utility"] = _utility_numbers(source, tokenizer, fmt, plan, opts)
        if utility_cache is not None:
            utility_cache["numbers"] = dict(out["utility"])
    out["model_utility"] = harmonic_mean(list(out["utility"].values()))
    return out


def retrain_method(seed: int) -> str:
    return f"retrain(seed={seed})"


def is_retrain(method: str) -> bool:
    return method.startswith("retrain(seed=")


def rank_correlation(ratios: Sequence[float], oracle_ratios: Sequence[float]) -> float | None:
    """Spearman ρ of a model's per-question forget truth ratios with the oracle's (same questions, same order).

    Forget quality (KS) compares only the two distributions; ρ says whether a method forgets the way
    retraining does, question by question."""
    from scipy.stats import spearmanr

    if len(ratios) != len(oracle_ratios) or len(ratios) < 3 or len(set(ratios)) < 2 or len(set(oracle_ratios)) < 2:
        return None  # too few questions, or a constant side: no ranking to correlate
    rho = spearmanr(ratios, oracle_ratios).statistic
    return None if not np.isfinite(rho) else float(rho)


def acceptance(rows: list[dict], splits: Sequence[str]) -> dict:
    """ULD's goals per split: forget quality ≥ 0.9, utility ≥ 0.98·the base's, and better than GA / GradDiff /
    NPO on both."""
    out = {}
    for split in splits:
        by = {r["method"]: r for r in rows if r["split"] == split}
        if "uld" not in by or "base" not in by:
            continue
        uld, base = by["uld"], by["base"]
        checks = {
            "uld_forget_quality_ge_0.9": uld["forget_quality"] >= 0.9,
            "uld_utility_ge_0.98_base": uld["model_utility"] >= 0.98 * base["model_utility"],
        }
        for other in ("ga", "graddiff", "npo"):
            if other in by:
                checks[f"uld_beats_{other}"] = (uld["forget_quality"] > by[other]["forget_quality"]
                                                and uld["model_utility"] > by[other]["model_utility"])
        # what retraining itself scores against the oracle: the metric's own ceiling at this scale (context only)
        retrain = {r["method"]: r["forget_quality"] for r in by.values() if is_retrain(r["method"])}
        out[split] = {"checks": checks, "met": all(checks.values()), "retrain_forget_quality": retrain}
    return out
