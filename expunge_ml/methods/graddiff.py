"""GradDiff — gradient ascent on forget + descent on retain (Liu et al. 2022, "Continual Learning and Private Unlearning"; TOFU baseline).

Descending the retain NLL alongside ascending the forget NLL keeps the model's other answers from
collapsing with the forgotten ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..corpus import QARecord
from ..prompting import PromptFormat
from .losses import answer_nll
from .loop import LoopConfig, MethodReport, Plan, Progress, pair_collate, run_loop

NAME = "graddiff"


@dataclass(frozen=True)
class Config(LoopConfig):
    retain_weight: float = 1.0  # λ in −NLL(forget) + λ·NLL(retain)


def loss_graddiff(forget_nll: torch.Tensor, retain_nll: torch.Tensor, retain_weight: float = 1.0) -> torch.Tensor:
    return -forget_nll + retain_weight * retain_nll


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config, **extra) -> Plan:
    def step_loss(forget_batch, retain_batch):
        f_nll = answer_nll(model, forget_batch)
        parts = {"forget_nll": float(f_nll.detach())}
        if retain_batch is None:
            return loss_graddiff(f_nll, torch.zeros_like(f_nll), 0.0), parts
        r_nll = answer_nll(model, retain_batch)
        parts["retain_nll"] = float(r_nll.detach())
        return loss_graddiff(f_nll, r_nll, config.retain_weight), parts

    collate = pair_collate(tokenizer, fmt, config.max_length)
    return Plan(step_loss, [r.pair for r in forget_records], collate, [r.pair for r in retain_records], collate)


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
