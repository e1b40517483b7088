"""IdkDPO — DPO towards a refusal (Rafailov et al. 2023 DPO, as the "IDK" preference baseline of Maini et al. 2024 TOFU / Zhang et al. 2024 NPO).

Preferred answer = an "I don't know"-style refusal, dispreferred = the true forget answer, against the
model before unlearning as reference. Unlike GA/NPO it says what to answer instead, so the model
refuses rather than babbles. Plus a retain NLL term.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..corpus import QARecord
from ..prompting import PromptFormat
from .losses import answer_log_probs, reference_log_probs, retain_nll_term
from .loop import LoopConfig, MethodReport, Plan, Progress, pair_collate, run_loop

NAME = "idkdpo"

DEFAULT_IDK_ANSWERS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure.",
    "I have no information about that.",
    "I can't answer that.",
    "I don't have any details on that.",
    "That's not something I know.",
    "I'm afraid I can't say.",
    "I have no idea.",
    "Sorry, I don't know the answer to that.",
    "I don't have that information.",
)


@dataclass(frozen=True)
class Config(LoopConfig):
    beta: float = 0.1
    retain_weight: float = 1.0


def loss_dpo(chosen_log_prob: torch.Tensor, rejected_log_prob: torch.Tensor,
             ref_chosen_log_prob: torch.Tensor, ref_rejected_log_prob: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """−(2/β)·mean log σ(β·[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]).

    Summed sequence log-probs [B]. The 2/β factor (not in the DPO paper; used by the NPO and
    open-unlearning code) puts the loss on NPO's scale; it only rescales the gradient.
    """
    margin = (chosen_log_prob - ref_chosen_log_prob) - (rejected_log_prob - ref_rejected_log_prob)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def _collate(tokenizer, fmt, max_length):
    pairs = pair_collate(tokenizer, fmt, max_length)

    def collate(items):
        return {
            "chosen": pairs([(q, idk) for q, _, idk, _, _ in items]),
            "rejected": pairs([(q, a) for q, a, _, _, _ in items]),
            "ref_chosen": torch.tensor([it[3] for it in items], dtype=torch.float32),
            "ref_rejected": torch.tensor([it[4] for it in items], dtype=torch.float32),
        }

    return collate


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config,
            idk_answers: Sequence[str] | None = None, **extra) -> Plan:
    idk_answers = DEFAULT_IDK_ANSWERS if idk_answers is None else idk_answers
    if not idk_answers:
        raise ValueError("idkdpo needs at least one refusal answer")
    # One fixed refusal per question (seeded), so π_ref of every sequence can be computed once up front.
    rng = random.Random(config.seed)
    triples = [(r.question, r.answer, rng.choice(list(idk_answers))) for r in forget_records]
    ref_chosen = reference_log_probs(model, tokenizer, fmt, [(q, i) for q, _, i in triples],
                                     config.batch_size, config.max_length)
    ref_rejected = reference_log_probs(model, tokenizer, fmt, [(q, a) for q, a, _ in triples],
                                       config.batch_size, config.max_length)
    items = [(q, a, i, rc, rr) for (q, a, i), rc, rr in zip(triples, ref_chosen, ref_rejected)]

    def step_loss(forget_batch, retain_batch):
        chosen, _ = answer_log_probs(model, forget_batch["chosen"])
        rejected, _ = answer_log_probs(model, forget_batch["rejected"])
        dpo = loss_dpo(chosen, rejected, forget_batch["ref_chosen"], forget_batch["ref_rejected"], config.beta)
        retain, parts = retain_nll_term(model, retain_batch, config.retain_weight)
        return dpo + retain, {"dpo": float(dpo.detach()), **parts}

    retain_items = [r.pair for r in retain_records] if config.retain_weight else []
    return Plan(step_loss, items, _collate(tokenizer, fmt, config.max_length),
                retain_items, pair_collate(tokenizer, fmt, config.max_length))


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, idk_answers: Sequence[str] | None = None,
            **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, idk_answers=idk_answers, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
