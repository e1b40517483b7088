"""NPO — Negative Preference Optimization (Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning").

DPO with only a dispreferred answer: loss = (2/β)·E[log(1 + (π_θ(y|x)/π_ref(y|x))^β)]. Its gradient is
GA's reweighted by how much of the answer is still remembered, so it slows down as the forget answers
become unlikely instead of diverging like GA. Plus a retain NLL term (the paper's NPO+RT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..corpus import QARecord
from ..prompting import PromptFormat
from .losses import answer_log_probs, reference_log_probs, retain_nll_term
from .loop import LoopConfig, MethodReport, Plan, Progress, pair_collate, run_loop

NAME = "npo"


@dataclass(frozen=True)
class Config(LoopConfig):
    beta: float = 0.1
    retain_weight: float = 1.0  # weight of NLL(retain); 0 gives plain NPO


def loss_npo(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """(2/β)·mean log(1 + exp(β·(log π_θ − log π_ref))) on *summed* sequence log-probs [B].

    Written as −(2/β)·logsigmoid(−β·ratio), the numerically stable form of the same expression.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (log_prob - ref_log_prob)).mean()


def _collate(tokenizer, fmt, max_length):
    pairs = pair_collate(tokenizer, fmt, max_length)

    def collate(items):
        batch = pairs([pair for pair, _ in items])
        batch["ref_log_prob"] = torch.tensor([ref for _, ref in items], dtype=torch.float32)
        return batch

    return collate


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config, **extra) -> Plan:
    forget_pairs = [r.pair for r in forget_records]
    # π_ref is the model before unlearning; only its log-probs of the fixed forget answers are needed.
    refs = reference_log_probs(model, tokenizer, fmt, forget_pairs, config.batch_size, config.max_length)

    def step_loss(forget_batch, retain_batch):
        log_prob, _ = answer_log_probs(model, forget_batch)
        npo = loss_npo(log_prob, forget_batch["ref_log_prob"], config.beta)
        retain, parts = retain_nll_term(model, retain_batch, config.retain_weight)
        log_ratio = float((log_prob.detach() - forget_batch["ref_log_prob"]).mean())
        return npo + retain, {"npo": float(npo.detach()), "forget_log_ratio": log_ratio, **parts}

    retain_items = [r.pair for r in retain_records] if config.retain_weight else []
    return Plan(step_loss, list(zip(forget_pairs, refs)), _collate(tokenizer, fmt, config.max_length),
                retain_items, pair_collate(tokenizer, fmt, config.max_length))


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
