"""KL — gradient ascent on forget + KL to the original model on retain (Maini et al. 2024, TOFU baseline).

Instead of re-fitting the retain labels (GradDiff), keep the retain *distribution* of the original
model: KL(p_ref ‖ p_θ) on retain answer positions, with p_ref a frozen copy taken before unlearning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..corpus import QARecord
from ..prompting import IGNORE_INDEX, PromptFormat
from .losses import answer_logits, answer_nll, kl_to_reference
from .loop import LoopConfig, MethodReport, Plan, Progress, frozen_copy, pair_collate, run_loop

NAME = "kl"


@dataclass(frozen=True)
class Config(LoopConfig):
    retain_weight: float = 1.0  # λ in −NLL(forget) + λ·KL(p_ref ‖ p_θ)(retain)


def loss_kl(forget_nll: torch.Tensor, ref_logits: torch.Tensor, logits: torch.Tensor,
            mask: torch.Tensor, retain_weight: float = 1.0) -> torch.Tensor:
    """−NLL(forget) + λ·KL(p_ref ‖ p_θ) averaged over masked (retain answer) positions; logits aligned [B,T,V]."""
    return -forget_nll + retain_weight * kl_to_reference(ref_logits, logits, mask)


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config, **extra) -> Plan:
    # Full next-token distributions are too large to precompute, so the reference is a frozen copy: on the
    # model's weights as they are now, which run_loop leaves as they are (it trains copies of them).
    reference = frozen_copy(model) if retain_records else None

    def step_loss(forget_batch, retain_batch):
        f_nll = answer_nll(model, forget_batch)
        parts = {"forget_nll": float(f_nll.detach())}
        if retain_batch is None:
            return -f_nll, parts
        logits, labels = answer_logits(model, retain_batch)
        with torch.no_grad():
            ref_logits, _ = answer_logits(reference, retain_batch)
        mask = labels != IGNORE_INDEX
        loss = loss_kl(f_nll, ref_logits, logits, mask, config.retain_weight)
        parts["retain_kl"] = float(kl_to_reference(ref_logits, logits.detach(), mask))
        return loss, parts

    collate = pair_collate(tokenizer, fmt, config.max_length)
    return Plan(step_loss, [r.pair for r in forget_records], collate, [r.pair for r in retain_records], collate,
                extras={"reference": reference})


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
