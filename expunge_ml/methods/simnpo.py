"""SimNPO — reference-free, length-normalised NPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning").

loss = −(2/β)·E[log σ(−(β/|y|)·log π_θ(y|x) − δ)]: NPO's reference model is replaced by the answer
length, so long answers are not over-penalised and no reference copy or precomputation is needed.
Plus a retain NLL term, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..corpus import QARecord
from ..prompting import PromptFormat
from .losses import answer_log_probs, retain_nll_term
from .loop import LoopConfig, MethodReport, Plan, Progress, pair_collate, run_loop

NAME = "simnpo"


@dataclass(frozen=True)
class Config(LoopConfig):
    beta: float = 2.5
    delta: float = 0.0  # reward margin δ (the paper's γ)
    retain_weight: float = 1.0


def loss_simnpo(log_prob: torch.Tensor, n_tokens: torch.Tensor, beta: float = 2.5, delta: float = 0.0) -> torch.Tensor:
    """−(2/β)·mean log σ(−(β/|y|)·log π_θ(y|x) − δ) on summed log-probs [B] and answer lengths [B]."""
    mean_log_prob = log_prob / n_tokens.to(log_prob.dtype).clamp(min=1.0)
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_log_prob - delta).mean()


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config, **extra) -> Plan:
    def step_loss(forget_batch, retain_batch):
        log_prob, n_tokens = answer_log_probs(model, forget_batch)
        simnpo = loss_simnpo(log_prob, n_tokens, config.beta, config.delta)
        retain, parts = retain_nll_term(model, retain_batch, config.retain_weight)
        return simnpo + retain, {"simnpo": float(simnpo.detach()), **parts}

    collate = pair_collate(tokenizer, fmt, config.max_length)
    retain_items = [r.pair for r in retain_records] if config.retain_weight else []
    return Plan(step_loss, [r.pair for r in forget_records], collate, retain_items, collate)


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
