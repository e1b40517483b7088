"""GA — Gradient Ascent on the forget set (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks").

The simplest baseline: maximise the NLL of the forget answers. Nothing anchors the rest of the model,
so it is the lower bound the other methods must beat on utility.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..corpus import QARecord
from ..prompting import PromptFormat
from .losses import answer_nll
from .loop import LoopConfig, MethodReport, Plan, Progress, pair_collate, run_loop

NAME = "ga"


@dataclass(frozen=True)
class Config(LoopConfig):
    pass


def loss_ga(forget_nll: torch.Tensor) -> torch.Tensor:
    """−NLL(forget): descending this ascends the forget likelihood's negative log."""
    return -forget_nll


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config, **extra) -> Plan:
    def step_loss(forget_batch, _retain_batch):
        nll = answer_nll(model, forget_batch)
        return loss_ga(nll), {"forget_nll": float(nll.detach())}

    # GA never looks at the retain set, so it gets no retain batches (no wasted forward passes).
    return Plan(step_loss, [r.pair for r in forget_records], pair_collate(tokenizer, fmt, config.max_length))


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
