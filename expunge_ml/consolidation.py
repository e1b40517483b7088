"""Consolidation: a served composite (the base with N stacked ULD assistants subtracted) distilled into one
standalone model, so serving costs one forward pass again and no assistant (a copy of what was erased) is needed.

The student is a copy of the base with LoRA on every linear layer, trained so that its next-token distribution
matches the composite's at the answer positions of question/answer pairs (KL(composite ‖ student)): the erased
records' questions, where the composite no longer states the answers, and retained records, where it still
does. The adapters are then merged: the result is a plain causal LM of the base's size.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .prompting import PromptFormat, collate_qa, position_ids_from_mask

# A token the composite rules out (relative top) has log-probability -inf; as a finite floor its probability
# is still 0 and the KL term stays a number.
LOG_PROB_FLOOR = -1e4


@dataclass(frozen=True)
class ConsolidationConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0


@dataclass(frozen=True)
class ConsolidationReport:
    steps: int
    seconds: float
    first_kl: float
    last_kl: float  # mean KL per answer token over the last epoch


def _answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict an answer token (the token after them is labelled)."""
    return labels[:, 1:] != -100


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) per masked position; logits [batch, positions, vocab], mask [batch, positions]."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1).clamp(min=LOG_PROB_FLOOR)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def student_of(base: torch.nn.Module, config: ConsolidationConfig) -> torch.nn.Module:
    """A trainable copy of the base: LoRA on every linear layer (a copy, since merging writes into the weights)."""
    from peft import LoraConfig, get_peft_model

    student = copy.deepcopy(base)
    student.requires_grad_(False)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(student, lora)


def distill(base: torch.nn.Module, teacher, tokenizer, fmt: PromptFormat, pairs: Sequence[tuple[str, str]],
            config: ConsolidationConfig = ConsolidationConfig(),
            progress: Callable[[int, float], None] | None = None) -> tuple[torch.nn.Module, ConsolidationReport]:
    """The base taught `teacher`'s (a `LogitSource`: the served composite) distribution on `pairs`; returns the
    merged standalone model and how training went. `progress(epoch, mean KL)` hears of each epoch."""
    if not pairs:
        raise ValueError("consolidation needs question/answer pairs to distil on")
    torch.manual_seed(config.seed)
    order = random.Random(config.seed)
    student = student_of(base, config)
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr)
    device = next(base.parameters()).device
    started, steps, epoch_kls = time.perf_counter(), 0, []
    for epoch in range(1, config.epochs + 1):
        shuffled = list(pairs)
        order.shuffle(shuffled)
        losses = []
        for start in range(0, len(shuffled), config.batch_size):
            batch = collate_qa(tokenizer, fmt, shuffled[start:start + config.batch_size], config.max_length)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            positions = position_ids_from_mask(mask)
            with torch.no_grad():
                teacher_logits, _ = teacher.step(ids, mask, positions)
            student_logits = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            answer = _answer_positions(batch["labels"].to(device)).float()
            loss = distillation_loss(teacher_logits[:, :-1], student_logits[:, :-1], answer)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            steps += 1
        epoch_kls.append(sum(losses) / len(losses))
        if progress:
            progress(epoch, epoch_kls[-1])
    student.eval()
    merged = student.merge_and_unload()
    merged.requires_grad_(False)
    return merged, ConsolidationReport(steps=steps, seconds=round(time.perf_counter() - started, 1),
                                       first_kl=round(epoch_kls[0], 5), last_kl=round(epoch_kls[-1], 5))
