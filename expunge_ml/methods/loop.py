"""The training loop shared by the full-model baselines (GA, GradDiff, KL, NPO, SimNPO, IdkDPO, RMU, WHP).

A method only says how one step's loss is computed (`Plan.step_loss`) and what its forget/retain
items are; the loop owns batching, optimisation and reporting, so the baselines differ only in their
objective and a comparison between them is not confounded by different training code.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..devices import model_device, to_device
from ..prompting import collate_qa

# step_loss(forget_batch, retain_batch or None) -> (loss to minimise, named scalar parts for logging)
StepLoss = Callable[[Any, Any], tuple[torch.Tensor, dict[str, float]]]
Progress = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class LoopConfig:
    # Defaults follow the TOFU full-fine-tuning setup (Maini et al. 2024) for 7B models; tiny from-scratch
    # models need a larger lr (profiles override these).
    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 8
    max_steps: int | None = None  # stop early after this many optimiser steps (None: run all epochs)
    seed: int = 0
    grad_clip: float | None = 1.0  # max global grad norm; None or 0 disables clipping
    weight_decay: float = 0.01
    max_length: int = 256  # tokens per QA pair (prompt + answer)


@dataclass
class MethodReport:
    method: str
    epochs: int
    steps: int
    seconds: float
    final_losses: dict[str, float]  # means over the last epoch's steps, including "loss"


@dataclass
class Plan:
    """Everything a method prepares before the loop: items, how to batch them, and the step objective."""

    step_loss: StepLoss
    forget_items: Sequence[Any]
    collate_forget: Callable[[list], Any]
    retain_items: Sequence[Any] = ()
    collate_retain: Callable[[list], Any] | None = None
    # Only these parameters are optimised (others are frozen for the run); None: all that require grad.
    params: list[torch.nn.Parameter] | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific state worth inspecting


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference of `model` as it is now (in eval mode, no grads) that shares the model's weight storage
    (`modeling.shared_copy`). It stays the model as it was because `run_loop` trains new storage, never the tensors
    a model came with; a caller that writes into the model's weights by other means must not rely on it."""
    from ..modeling import shared_copy

    reference = shared_copy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference


@torch.no_grad()
def train_own_storage(params: Sequence[torch.nn.Parameter]) -> None:
    """Move each parameter onto a copy of its data, so the steps write there and never into the storage it came
    with, which a frozen reference or the caller's base may share; unshared storage is freed one tensor at a time."""
    for p in params:
        p.data = p.data.clone()


def pair_collate(tokenizer, fmt, max_length: int) -> Callable[[list], dict]:
    """Collate (question, answer) items with the shared prompt format."""
    return lambda pairs: collate_qa(tokenizer, fmt, pairs, max_length)


def run_loop(
    model: torch.nn.Module,
    plan: Plan,
    config: LoopConfig,
    *,
    method: str,
    progress: Progress | None = None,
) -> MethodReport:
    """Balanced sampling: every step sees one forget batch and (if any retain items) one retain batch. The trained
    parameters are first moved to new storage (`train_own_storage`): the tensors `model` came with are never written.

    An epoch is one pass over the forget items; the retain items are cycled (reshuffled on every wrap), so
    a large retain set does not dilute the forget signal and a small one is simply revisited.
    """
    if not plan.forget_items:
        raise ValueError("the forget set is empty")
    if config.epochs < 1 or config.batch_size < 1 or (config.max_steps is not None and config.max_steps < 1):
        raise ValueError(f"epochs, batch_size and max_steps must be >= 1, got {config}")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    device = model_device(model)
    params = list(plan.params) if plan.params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameters to optimise")
    train_own_storage(params)
    # Freeze everything not in `params` for the run: no wasted gradients, and restore the flags afterwards.
    chosen = {id(p) for p in params}
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved_flags:
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    forget_order = list(range(len(plan.forget_items)))
    retain_order = list(range(len(plan.retain_items)))
    retain_cursor = 0
    steps_per_epoch = math.ceil(len(forget_order) / config.batch_size)
    start, step, epoch, means = time.perf_counter(), 0, 0, {}
    model.train()
    try:
        for epoch in range(1, config.epochs + 1):
            rng.shuffle(forget_order)
            sums: dict[str, float] = {}
            epoch_steps = 0
            for i in range(steps_per_epoch):
                idx = forget_order[i * config.batch_size : (i + 1) * config.batch_size]
                forget_batch = to_device(plan.collate_forget([plan.forget_items[j] for j in idx]), device)
                retain_batch = None
                if retain_order:
                    if retain_cursor == 0:
                        rng.shuffle(retain_order)
                    ridx = [retain_order[(retain_cursor + k) % len(retain_order)] for k in range(config.batch_size)]
                    retain_cursor = (retain_cursor + config.batch_size) % len(retain_order)
                    retain_batch = to_device(plan.collate_retain([plan.retain_items[j] for j in ridx]), device)
                loss, parts = plan.step_loss(forget_batch, retain_batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{method}: non-finite loss at step {step + 1}: {parts}")
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_steps += 1
                for name, value in {"loss": float(loss.detach()), **parts}.items():
                    sums[name] = sums.get(name, 0.0) + value
                if config.max_steps is not None and step >= config.max_steps:
                    break
            means = {k: v / epoch_steps for k, v in sums.items()}
            if progress:
                progress(epoch, means)
            if config.max_steps is not None and step >= config.max_steps:
                break
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.eval()
    return MethodReport(method, epoch, step, time.perf_counter() - start, means)
