"""RMU — Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning").

Instead of editing output probabilities, scramble the internal representation of forget inputs at one
layer ℓ: push h_ℓ(forget) towards a fixed random direction c·u (later layers then read noise), while
keeping h_ℓ(retain) equal to a frozen copy's. loss = MSE(h_ℓ(forget), c·u) + α·MSE(h_ℓ(retain), h_ℓ^frozen(retain)).

Choices (documented deviations from the reference code):
- Updated parameters: all MLP weights of layers ℓ−2..ℓ (the paper's text; its code updates only
  down_proj of those layers). Nothing above ℓ changes, so the scrambled h_ℓ is what later layers see.
- Forget positions: only those that produce answer tokens (the reference uses every token of the forget
  text). With QA prompts the template tokens ("Question: …") are shared with the retain set, and
  pushing them to c·u would fight the retain term.
- c: the paper's 6.5 was tuned for Zephyr-7B activations; `steering_relative=True` makes c a multiple of
  the base's mean ‖h_ℓ‖ on the forget answers, which transfers to models of any size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..corpus import QARecord
from ..devices import model_device, to_device
from ..prompting import PromptFormat
from .losses import answer_positions, masked_mse, qa_inputs
from .loop import LoopConfig, MethodReport, Plan, Progress, frozen_copy, pair_collate, run_loop

NAME = "rmu"


@dataclass(frozen=True)
class Config(LoopConfig):
    lr: float = 5e-5  # WMDP's learning rate
    layer: int | None = None  # ℓ (0-based decoder layer); None: the middle one, (n_layers − 1) // 2
    update_layers: int = 3  # optimise the MLPs of layers ℓ−update_layers+1 .. ℓ
    steering_coeff: float = 6.5  # c
    steering_relative: bool = False  # True: c := steering_coeff · mean ‖h_ℓ(forget)‖ of the base
    alpha: float = 100.0  # retain weight α


def loss_rmu(forget_hidden: torch.Tensor, control: torch.Tensor, forget_mask: torch.Tensor,
             retain_hidden: torch.Tensor | None = None, frozen_retain_hidden: torch.Tensor | None = None,
             retain_mask: torch.Tensor | None = None, alpha: float = 100.0) -> torch.Tensor:
    """MSE(h(forget), c·u) + α·MSE(h(retain), h_frozen(retain)) over masked positions of [B,T,D] tensors."""
    loss = masked_mse(forget_hidden, control, forget_mask)
    if retain_hidden is not None:
        loss = loss + alpha * masked_mse(retain_hidden, frozen_retain_hidden, retain_mask)
    return loss


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks, found by length so it works across HF architectures."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def _mlp(layer: torch.nn.Module) -> torch.nn.Module:
    for name in ("mlp", "feed_forward", "ffn"):
        if isinstance(getattr(layer, name, None), torch.nn.Module):
            return getattr(layer, name)
    raise ValueError(f"cannot find the MLP of {type(layer).__name__}")


def hidden_at(model: torch.nn.Module, batch: dict, layer: int) -> torch.Tensor:
    """Output of decoder layer `layer` [B,T,D]. hidden_states[0] is the embedding output, so layer ℓ is
    at index ℓ+1 (for the last layer HF returns it after the final norm). Only one logit row is kept:
    RMU never looks at the LM head."""
    out = model(**qa_inputs(batch), output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[layer + 1]


def resolve_layer(model: torch.nn.Module, config: Config) -> int:
    n = model.config.num_hidden_layers
    layer = (n - 1) // 2 if config.layer is None else config.layer
    if not 0 <= layer < n:
        raise ValueError(f"RMU layer {layer} must be in 0..{n - 1}")
    return layer


def prepare(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config, **extra) -> Plan:
    layer = resolve_layer(model, config)
    layers = decoder_layers(model)
    first = max(0, layer - config.update_layers + 1)
    params = [p for i in range(first, layer + 1) for p in _mlp(layers[i]).parameters()]
    collate = pair_collate(tokenizer, fmt, config.max_length)
    forget_pairs = [r.pair for r in forget_records]

    # The fixed random direction u: uniform [0,1)^D then normalised, as in the reference code.
    generator = torch.Generator().manual_seed(config.seed)
    u = torch.rand(model.config.hidden_size, generator=generator)
    u = u / u.norm()
    coeff = config.steering_coeff
    if config.steering_relative:
        coeff *= _mean_norm(model, forget_pairs, collate, layer, config.batch_size)
    control = (coeff * u).to(model_device(model))
    reference = frozen_copy(model) if retain_records else None

    def step_loss(forget_batch, retain_batch):
        f_h = hidden_at(model, forget_batch, layer)
        f_mask = answer_positions(forget_batch["labels"])
        if retain_batch is None:
            loss = loss_rmu(f_h, control, f_mask)
            return loss, {"forget_mse": float(loss.detach())}
        r_h = hidden_at(model, retain_batch, layer)
        with torch.no_grad():
            r_frozen = hidden_at(reference, retain_batch, layer)
        r_mask = retain_batch["attention_mask"].bool()
        loss = loss_rmu(f_h, control, f_mask, r_h, r_frozen, r_mask, config.alpha)
        return loss, {"forget_mse": float(masked_mse(f_h.detach(), control, f_mask)),
                      "retain_mse": float(masked_mse(r_h.detach(), r_frozen, r_mask))}

    return Plan(step_loss, forget_pairs, collate, [r.pair for r in retain_records], collate, params=params,
                extras={"layer": layer, "updated_layers": list(range(first, layer + 1)), "control": control,
                        "reference": reference})


@torch.no_grad()
def _mean_norm(model, pairs, collate, layer: int, batch_size: int) -> float:
    total, count = 0.0, 0
    device = model_device(model)
    was_training = model.training
    model.eval()
    for i in range(0, len(pairs), batch_size):
        batch = to_device(collate(pairs[i : i + batch_size]), device)
        mask = answer_positions(batch["labels"])
        norms = hidden_at(model, batch, layer).float().norm(dim=-1)
        total += float(norms[mask].sum())
        count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


def unlearn(model, tokenizer, fmt: PromptFormat, forget_records: Sequence[QARecord],
            retain_records: Sequence[QARecord], config: Config = Config(),
            progress: Progress | None = None, **extra) -> MethodReport:
    plan = prepare(model, tokenizer, fmt, forget_records, retain_records, config, **extra)
    return run_loop(model, plan, config, method=NAME, progress=progress)
