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
from .prompting import encode_prompt, pad_batch, pad_token_id, position_ids_from_mask

__all__ = [
    "MIA_METHODS",
    "standardised_token_scores",
    "token_log_probs",
    "token_scores",
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


@torch.no_grad()
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
    pad_id = pad_token_id(tokenizer)
    results: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        chunk = [encode_prompt(tokenizer, t)[:max_length] for t in texts[start : start + batch_size]]
        for offset, ids in enumerate(chunk):
            if len(ids) < 2:
                raise ValueError(f"text #{start + offset} has fewer than 2 tokens; nothing to score")
        input_ids, mask = pad_batch(chunk, pad_id, side="right")
        logits, _ = source.step(input_ids, mask, position_ids_from_mask(mask))
        for row, ids in enumerate(chunk):
            n = len(ids)
            # Row by row: only one [T, V] log-softmax is alive at a time (B·T·V floats add up fast).
            row_logits, targets = logits[row, : n - 1], input_ids[row, 1:n]
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
    if method not in MIA_METHODS:
        raise ValueError(f"method must be one of {MIA_METHODS}, got {method!r}")
    per_token = token_scores(source, tokenizer, texts, batch_size, standardise=method == "min_k_pp")
    effective_k = 1.0 if method == "loss" else k
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
