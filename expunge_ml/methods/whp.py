"""WHP — Who's Harry Potter? (Eldan & Russinovich 2023, "Who's Harry Potter? Approximate Unlearning in LLMs").

Fine-tune the model towards what a model that never saw the subject would have said:
1. reinforce: a copy of the base fine-tuned further on the forget data; tokens whose logits it raises
   are the ones that come from knowing the subject;
2. generic logits v_generic = v_base − α·ReLU(v_reinforced − v_base) suppress exactly those tokens;
3. anchored terms (the subject's name and identifiers, passed in by the caller) are replaced by generic
   ones ("the person") in the forget answers, so the targets do not re-teach them;
4. fine-tune the base with NLL on argmax(v_generic) at every answer position of the replaced answers.

Deviation: the paper translates anchored terms in the *input* text and maps predictions back to the
original tokens. Here the subject lives in the question, which is kept verbatim, and only answers are
translated, so the model learns "question about the subject → generic answer" with no token alignment.
The paper has no retain term; `retain_weight` (default 0) can add a retain NLL.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..corpus import QARecord
from ..devices import model_device, to_device
from ..prompting import IGNORE_INDEX, PromptFormat, pad_batch, pad_token_id
from .losses import answer_logits, answer_nll, retain_nll_term, token_nll
from .loop import LoopConfig, MethodReport, Plan, Progress, frozen_copy, pair_collate, run_loop

NAME = "whp"


@dataclass(frozen=True)
class Config(LoopConfig):
    alpha: float = 5.0
    reinforce_epochs: int = 3  # 0: no reinforcement, only anchored-term replacement
    reinforce_lr: float | None = None  # None: same as lr
    retain_weight: float = 0.0  # not in the paper


def generic_logits(base_logits: torch.Tensor, reinforced_logits: torch.Tensor, alpha: float = 5.0) -> torch.Tensor:
    """v_base − α·ReLU(v_reinforced − v_base): only tokens the reinforced model boosts are pushed down."""
    return base_logits - alpha * torch.relu(reinforced_logits - base_logits)


def generic_labels(base_logits: torch.Tensor, reinforced_logits: torch.Tensor, labels: torch.Tensor,
                   alpha: float = 5.0) -> torch.Tensor:
    """argmax v_generic at counted positions of aligned [B,T,V] logits / [B,T] labels; IGNORE elsewhere."""
    best = generic_logits(base_logits.float(), reinforced_logits.float(), alpha).argmax(dim=-1)
    return torch.where(labels != IGNORE_INDEX, best, torch.full_like(best, IGNORE_INDEX))


def loss_whp(logits: torch.Tensor, target_labels: torch.Tensor) -> torch.Tensor:
    """NLL of the generic labels (aligned logits [B,T,V], labels [B,T])."""
    return token_nll(logits, target_labels)


def replace_anchored(text: str, anchors: Mapping[str, str]) -> str:
    """Replace anchored terms by their generic translations: case-insensitive, whole words, longest first
    (so "Ada Lovelace" wins over "Ada")."""
    keys = sorted((k for k in anchors if k.strip()), key=len, reverse=True)
    if not keys:
        return text
    lookup = {k.casefold(): v for k, v in anchors.items()}
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(k)}(?!\w)" for k in keys), re.IGNORECASE)
    return pattern.sub(lambda m: lookup[m.group(0).casefold()], text)


@torch.no_grad()
def _targets(model, reinforced, collate, pairs, config: Config) -> list[tuple[list[int], list[int]]]:
    """(input ids, generic labels) per replaced forget pair, labels in unshifted coordinates like collate_qa's."""
    items, device, was_training = [], model_device(model), model.training
    model.eval()
    for i in range(0, len(pairs), config.batch_size):
        batch = to_device(collate(pairs[i : i + config.batch_size]), device)
        base, labels = answer_logits(model, batch)
        boosted, _ = answer_logits(reinforced, batch)
        targets = generic_labels(base, boosted, labels, config.alpha)
        for row in range(targets.shape[0]):
            n = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :n].tolist()
            items.append((ids, [IGNORE_INDEX] + targets[row, : n - 1].tolist()))
    model.train(was_training)
    return items


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config,
            anchors: Mapping[str, str] | None = None, **extra) -> Plan:
    anchors = anchors or {}
    collate = pair_collate(tokenizer, fmt, config.max_length)
    forget_pairs = [r.pair for r in forget_records]
    if not forget_pairs:
        raise ValueError("the forget set is empty")

    # Shares the model's weights; run_loop trains copies of them, so reinforcing leaves the model as it was.
    reinforced = frozen_copy(model)
    if config.reinforce_epochs > 0:
        reinforced.requires_grad_(True)

        def nll_step(batch, _retain):
            nll = answer_nll(reinforced, batch)
            return nll, {"nll": float(nll.detach())}

        boost = LoopConfig(epochs=config.reinforce_epochs, lr=config.reinforce_lr or config.lr,
                           batch_size=config.batch_size, seed=config.seed, grad_clip=config.grad_clip,
                           weight_decay=config.weight_decay, max_length=config.max_length)
        run_loop(reinforced, Plan(nll_step, forget_pairs, collate), boost, method=f"{NAME}-reinforce")
    replaced = [(q, replace_anchored(a, anchors)) for q, a in forget_pairs]
    items = _targets(model, reinforced, collate, replaced, config)
    del reinforced
    pad = pad_token_id(tokenizer)

    def collate_targets(batch_items):
        input_ids, mask = pad_batch([ids for ids, _ in batch_items], pad)
        labels, _ = pad_batch([lab for _, lab in batch_items], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def step_loss(forget_batch, retain_batch):
        logits, labels = answer_logits(model, forget_batch)
        whp = loss_whp(logits, labels)
        retain, parts = retain_nll_term(model, retain_batch, config.retain_weight)
        return whp + retain, {"generic_nll": float(whp.detach()), **parts}

    retain_items = [r.pair for r in retain_records] if config.retain_weight else []
    return Plan(step_loss, items, collate_targets, retain_items, collate,
                extras={"replaced_pairs": replaced})


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, anchors: Mapping[str, str] | None = None,
            **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, anchors=anchors, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
