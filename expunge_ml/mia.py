"""Membership inference (Min-K%, Min-K%++) and MUSE's PrivLeak for unlearned models.

Source: Shi et al. 2024 (MUSE, PrivLeak; Min-K% Prob) and Zhang et al. 2024 (Min-K%++, arXiv:2404.02936).

A model that truly forgot the forget set should find it no more "familiar" than text it never saw:
a member-vs-non-member AUC close to what a model retrained without the data achieves. PrivLeak
= (AUC_unlearned − AUC_retrain) / AUC_retrain is ≈ 0 for a good unlearning, large and positive for
under-unlearning (still remembers) and negative for over-unlearning (suspiciously *unfamiliar*,
which is itself a membership signal).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .logits import LogitSource
from .metrics import min_k_percent_score, roc_auc
from .prompting import IGNORE_INDEX, PromptFormat, encode_prompt, encode_qa, pad_batch, pad_token_id, position_ids_from_mask

__all__ = [
    "MIA_METHODS",
    "standardised_token_scores",
    "token_log_probs",
    "token_scores",
    "qa_answer_token_scores",
    "qa_mia_scores",
    "qa_mia_auc",
    "mia_scores",
    "mia_auc",
    "priv_leak",
]

MIA_METHODS = ("min_k", "min_k_pp", "loss")
# Floor for σ_t: a (near-)deterministic next-token distribution has σ = 0 and would divide by zero.
_SIGMA_FLOOR = 1e-6


def standardised_token_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Min-K%++ per-token scores (log p(x_t) − μ_t) / σ_t for logits [T, V] aligned with targets [T].

    μ_t = Σ_v p_v log p_v and σ_t² = Σ_v p_v (log p_v)² − μ_t² are the mean and variance of log p
    under the model's own next-token distribution, so a token scores high when it is more likely
    than the model's typical choice *at that position* — the local-maximum signature of training data.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    mu = (p * log_p).sum(-1)
    var = (p * log_p.square()).sum(-1) - mu.square()
    sigma = var.clamp(min=0.0).sqrt().clamp(min=_SIGMA_FLOOR)
    target_lp = log_p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return (target_lp - mu) / sigma


def token_scores(
    source: LogitSource,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    standardise: bool = False,
    max_length: int = 2048,
) -> list[list[float]]:
    """Per-token teacher-forced scores of each text: log p(x_t | x_<t), or Min-K%++ scores if `standardise`.

    Texts are encoded like prompts (with the tokenizer's BOS, if it adds one), right-padded in
    batches; pads are never scored. The first token has no context and is not scored, so a text
    needs at least two tokens (BOS counts).
    """
    sequences = []
    for index, text in enumerate(texts):
        ids = encode_prompt(tokenizer, text)[:max_length]
        if len(ids) < 2:
            raise ValueError(f"text #{index} has fewer than 2 tokens; nothing to score")
        sequences.append((ids, 1))
    return _score_sequences(source, tokenizer, sequences, batch_size, standardise)


def qa_answer_token_scores(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    standardise: bool = False,
    max_length: int = 256,
) -> list[list[float]]:
    """Per-token scores of the *answer* tokens of QA pairs, encoded exactly as they were trained.

    The question is context, not a candidate member: scoring it would let familiarity with a name in
    the question stand in for memorisation of the answer (a retrained model never saw that name either,
    but the attack is about what the model says, as in TOFU's MIA on answer labels).
    """
    sequences = []
    for index, (question, answer) in enumerate(pairs):
        ids, labels = encode_qa(tokenizer, fmt, question, answer, max_length)
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first is None or first == 0:
            raise ValueError(f"pair #{index} has no answer token to score within {max_length} tokens")
        sequences.append((ids, first))
    return _score_sequences(source, tokenizer, sequences, batch_size, standardise)


@torch.no_grad()
def _score_sequences(source: LogitSource, tokenizer, sequences: Sequence[tuple[list[int], int]], batch_size: int,
                     standardise: bool) -> list[list[float]]:
    """Scores of tokens ids[first:] of each (ids, first) given everything before them (first ≥ 1)."""
    pad_id = pad_token_id(tokenizer)
    results: list[list[float]] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        input_ids, mask = pad_batch([ids for ids, _ in chunk], pad_id, side="right")
        logits, _ = source.step(input_ids, mask, position_ids_from_mask(mask))
        for row, (ids, first) in enumerate(chunk):
            n = len(ids)
            # Row by row: only one [T, V] log-softmax is alive at a time (B·T·V floats add up fast).
            row_logits, targets = logits[row, first - 1 : n - 1], input_ids[row, first:n].to(logits.device)
            if standardise:
                scores = standardised_token_scores(row_logits, targets)
            else:
                log_p = torch.log_softmax(row_logits.float(), dim=-1)
                scores = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            results.append(scores.tolist())
    return results


def token_log_probs(source: LogitSource, tokenizer, texts: Sequence[str], batch_size: int = 16) -> list[list[float]]:
    """Teacher-forced log p(x_t | x_<t) for every scored token of every text (batched, padding-aware)."""
    return token_scores(source, tokenizer, texts, batch_size, standardise=False)


def mia_scores(
    source: LogitSource,
    tokenizer,
    texts: Sequence[str],
    method: str = "min_k",
    k: float = 0.2,
    batch_size: int = 16,
) -> list[float]:
    """One membership score per text (higher = more likely a training member).

    "min_k": mean of the lowest k% token log-probs; "min_k_pp": the same over Min-K%++ standardised
    scores; "loss": mean token log-prob (the plain loss attack, i.e. k = 100%).
    """
    _check_method(method)
    return _min_k_scores(token_scores(source, tokenizer, texts, batch_size, standardise=method == "min_k_pp"), method, k)


def qa_mia_scores(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    pairs: Sequence[tuple[str, str]],
    method: str = "min_k_pp",
    k: float = 0.2,
    batch_size: int = 16,
) -> list[float]:
    """`mia_scores` for QA pairs, over their answer tokens only (see `qa_answer_token_scores`)."""
    _check_method(method)
    per_token = qa_answer_token_scores(source, tokenizer, fmt, pairs, batch_size, standardise=method == "min_k_pp")
    return _min_k_scores(per_token, method, k)


def _check_method(method: str) -> None:
    if method not in MIA_METHODS:
        raise ValueError(f"method must be one of {MIA_METHODS}, got {method!r}")


def _min_k_scores(per_token: Sequence[Sequence[float]], method: str, k: float) -> list[float]:
    effective_k = 1.0 if method == "loss" else k  # the loss attack averages every token
    return [min_k_percent_score(scores, effective_k) for scores in per_token]


def mia_auc(
    source: LogitSource,
    tokenizer,
    member_texts: Sequence[str],
    nonmember_texts: Sequence[str],
    method: str = "min_k",
    k: float = 0.2,
    batch_size: int = 16,
) -> float:
    """ROC AUC of telling `member_texts` from `nonmember_texts` by `mia_scores` (0.5 = indistinguishable)."""
    if not member_texts or not nonmember_texts:
        raise ValueError("mia_auc needs at least one member and one non-member text")
    members = mia_scores(source, tokenizer, member_texts, method, k, batch_size)
    nonmembers = mia_scores(source, tokenizer, nonmember_texts, method, k, batch_size)
    return roc_auc(members, nonmembers)


def priv_leak(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE PrivLeak = (AUC_unlearned − AUC_retrain) / AUC_retrain; ≈ 0 means the retrain gold standard is matched."""
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retrain", auc_retrain)):
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            raise ValueError(f"{name} must be an AUC in [0, 1], got {value!r}")
    if auc_retrain == 0.0:
        raise ValueError("auc_retrain is 0: PrivLeak is undefined")
    return (auc_unlearned - auc_retrain) / auc_retrain


def qa_mia_auc(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    member_pairs: Sequence[tuple[str, str]],
    nonmember_pairs: Sequence[tuple[str, str]],
    method: str = "min_k_pp",
    k: float = 0.2,
    batch_size: int = 16,
) -> float:
    """`mia_auc` for QA pairs, scoring only answer tokens (see `qa_answer_token_scores`)."""
    _check_method(method)
    if not member_pairs or not nonmember_pairs:
        raise ValueError("qa_mia_auc needs at least one member and one non-member pair")
    return roc_auc(qa_mia_scores(source, tokenizer, fmt, member_pairs, method, k, batch_size),
                   qa_mia_scores(source, tokenizer, fmt, nonmember_pairs, method, k, batch_size))
