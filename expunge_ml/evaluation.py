"""Evaluate a model (any `LogitSource`) on named QA splits: greedy-answer ROUGE-L and answer probability."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .corpus import QARecord
from .generation import greedy_generate, score_answers
from .logits import LogitSource
from .metrics import length_normalised_prob, rouge_l_recall
from .muse import knowmem
from .prompting import PromptFormat


@dataclass(frozen=True)
class SplitMetrics:
    n: int
    rougeL_recall: float  # TOFU's answer overlap
    answer_prob: float
    rougeL_f1: float = float("nan")  # MUSE's KnowMem on the same greedy answers

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "rougeL_recall": self.rougeL_recall, "answer_prob": self.answer_prob,
                "rougeL_f1": self.rougeL_f1}


def evaluate_split(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    records: Sequence[QARecord],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> SplitMetrics:
    if not records:
        raise ValueError("cannot evaluate an empty split")
    prompts = [fmt.prompt(r.question) for r in records]
    answers = greedy_generate(source, tokenizer, prompts, max_new_tokens, batch_size)
    recalls = [rouge_l_recall(pred, r.answer) for pred, r in zip(answers, records)]
    scores = score_answers(source, tokenizer, fmt, [r.pair for r in records], batch_size)
    probs = [float(length_normalised_prob(s.sum_log_prob, s.n_tokens)) for s in scores]
    return SplitMetrics(len(records), float(np.mean(recalls)), float(np.nanmean(probs)),
                        knowmem(answers, [r.answer for r in records]))


def evaluate_splits(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    splits: Mapping[str, Sequence[QARecord]],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> dict[str, SplitMetrics]:
    return {
        name: evaluate_split(source, tokenizer, fmt, records, max_new_tokens, batch_size)
        for name, records in splits.items()
    }
