"""Batched TOFU truth ratios: how much more likely the model finds wrong answers than a correct paraphrase.

Source: Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs" (truth ratio R).

R = exp(mean_i lp(perturbed_i) − lp(paraphrased)) on length-normalised log-probs. A model that
knows the fact has R ≪ 1; one that forgot it cannot tell right from wrong (R ≈ 1). Using a
paraphrase instead of the training answer keeps the metric from just rewarding verbatim recall.
"""
from __future__ import annotations

import math

from typing import Any, Mapping, Sequence

import numpy as np

from .generation import score_answers
from .logits import LogitSource
from .prompting import PromptFormat

__all__ = ["log_truth_ratios", "truth_ratios"]


def _get(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)


def truth_ratios(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    records: Sequence[Any],
    batch_size: int = 16,
) -> list[float]:
    """One truth ratio per record (QARecord or dict with question, paraphrased_answer, perturbed_answers)."""
    # past e^709 a float is infinite: say so without numpy's overflow warning
    return [math.exp(r) if r < 709.0 else math.inf for r in log_truth_ratios(source, tokenizer, fmt, records, batch_size)]


def log_truth_ratios(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    records: Sequence[Any],
    batch_size: int = 16,
) -> list[float]:
    """log R per record, = mean_i lp(perturbed_i) − lp(paraphrased); stays finite where R underflows to 0.

    Every (question, answer) pair of every record is scored in one flat list, so batches are full
    regardless of how many perturbed answers each record has.
    """
    pairs: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []  # [start, end) of each record's pairs; pairs[start] is the paraphrase
    for index, record in enumerate(records):
        question = _get(record, "question")
        paraphrased = _get(record, "paraphrased_answer")
        perturbed = _get(record, "perturbed_answers") or ()
        if isinstance(perturbed, str):
            perturbed = (perturbed,)
        if not question or not paraphrased or not perturbed:
            rid = _get(record, "record_id") or f"#{index}"
            raise ValueError(f"record {rid} needs question, paraphrased_answer and perturbed_answers")
        start = len(pairs)
        pairs.append((question, paraphrased))
        pairs.extend((question, answer) for answer in perturbed)
        spans.append((start, len(pairs)))
    scores = score_answers(source, tokenizer, fmt, pairs, batch_size) if pairs else []
    return [
        float(np.asarray([s.mean_log_prob for s in scores[start + 1 : end]], dtype=np.float64).mean()
              - float(scores[start].mean_log_prob))
        for start, end in spans
    ]
