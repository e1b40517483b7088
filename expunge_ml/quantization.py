"""Simulated round-to-nearest weight quantization for the quantization attack on unlearned models.

Source: Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization" (arXiv:2410.16454).

Unlearning methods that only nudge weights a little (gradient ascent, NPO, small-LR fine-tunes) can
land inside the same quantization bucket as the original weights, so a 4-bit copy of the "unlearned"
model answers like the original again. A regulator-grade report therefore re-runs the leak checks on
a quantized copy. This module simulates quantization in floating point ("fake quant": quantize, then
dequantize straight back) so the copy runs through the same `LogitSource` code as everything else and
needs no bitsandbytes/GPU kernels.

Scheme: **symmetric** RTN with restricted range, one scale per output channel (row) or per group of
`group_size` consecutive input columns of a row: scale = max|w| / qmax, qmax = 2^(bits-1) - 1, and
w_hat = clamp(round(w / scale), -qmax, qmax) · scale. Symmetric means 0 is always exactly
representable (no zero-point), matching GPTQ/AWQ's symmetric setting and bitsandbytes' int8 absmax.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterable

import torch

__all__ = ["SUPPORTED_BITS", "fake_quantize_weight", "quantize_rtn_", "quantized_copy", "nf4_quantized_copy"]

SUPPORTED_BITS = (8, 4)


def _validate(bits: int, group_size: int | None) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")


@torch.no_grad()
def fake_quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = 128) -> torch.Tensor:
    """Quantize-dequantize a 2-D weight [out, in] with symmetric RTN; returns a new tensor of the same dtype.

    group_size=None: one scale per output row. Otherwise one scale per `group_size` input columns; a
    last, shorter group (in % group_size != 0, or in < group_size as in tiny test models) gets its own
    scale — zero-padding it for the max is harmless because |0| never raises a max.
    """
    _validate(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    qmax = 2 ** (bits - 1) - 1
    # float32 arithmetic: bf16/fp16 rounding of w/scale would itself move values across buckets.
    w = weight.detach().float()
    out_features, in_features = w.shape
    g = in_features if group_size is None else group_size
    n_groups = -(-in_features // g)
    pad = n_groups * g - in_features
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    grouped = w.reshape(out_features, n_groups, g)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / qmax
    # An all-zero group has scale 0: dividing by 1 instead keeps it exactly zero rather than NaN.
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(grouped / safe_scale), -qmax, qmax)
    dequant = (q * safe_scale).reshape(out_features, n_groups * g)[:, :in_features]
    return dequant.to(weight.dtype)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    # Match on dotted name components so a PEFT-wrapped "base_model.model.lm_head" is skipped too.
    parts = name.split(".")
    return any(s == name or s in parts for s in skip)


def _quantized_linears(model: torch.nn.Module, skip: Iterable[str]) -> list[torch.nn.Linear]:
    """The nn.Linear modules whose weights a quantization of `model` replaces (all but those `skip` names)."""
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _skipped(name, skip)]


def _copy_for_quantizing(model: torch.nn.Module, skip: Iterable[str]) -> torch.nn.Module:
    """A copy of `model` with its own storage only for the Linear weights a quantization rewrites; embeddings,
    norms, biases and skipped layers stay the model's tensors (`modeling.shared_copy`), read and never written."""
    from .modeling import shared_copy

    return shared_copy(model, own=[m.weight for m in _quantized_linears(model, skip)])


@torch.no_grad()
def quantize_rtn_(
    model: torch.nn.Module,
    bits: int,
    group_size: int | None = 128,
    skip: tuple[str, ...] = ("lm_head",),
) -> dict:
    """Fake-quantize every nn.Linear weight of `model` in place (biases, norms, embeddings untouched).

    The LM head is skipped by default because the published attack (and GPTQ/AWQ/bnb deployments)
    keep it in high precision. Merge LoRA adapters first (peft `merge_and_unload`): quantizing a
    separate low-rank delta is not what a deployer would do. For a ULD composite, quantize the base
    and the assistant separately.

    Returns {"bits", "group_size", "scheme", "n_layers", "n_params", "mean_abs_error",
    "max_abs_error"}, errors measured in float32 over all quantized weights.
    """
    _validate(bits, group_size)
    n_layers = n_params = 0
    abs_err_sum = 0.0
    max_err = 0.0
    for module in _quantized_linears(model, skip):
        original = module.weight.data
        quantized = fake_quantize_weight(original, bits, group_size)
        err = (quantized.float() - original.float()).abs()
        abs_err_sum += float(err.sum())
        max_err = max(max_err, float(err.max())) if err.numel() else max_err
        n_params += err.numel()
        n_layers += 1
        original.copy_(quantized)
    return {
        "bits": bits,
        "group_size": group_size,
        "scheme": "symmetric-rtn",
        "n_layers": n_layers,
        "n_params": n_params,
        "mean_abs_error": abs_err_sum / n_params if n_params else 0.0,
        "max_abs_error": max_err,
    }


def quantized_copy(
    model: torch.nn.Module,
    bits: int,
    group_size: int | None = 128,
    skip: tuple[str, ...] = ("lm_head",),
) -> torch.nn.Module:
    """A copy of `model` with `quantize_rtn_` applied (only the quantized weights are new tensors); the original
    is left untouched."""
    _validate(bits, group_size)  # fail before paying for the copy
    clone = _copy_for_quantizing(model, skip)
    quantize_rtn_(clone, bits, group_size, skip)
    return clone


@contextlib.contextmanager
def quiet_bitsandbytes_import():
    """Import-time quiet for bitsandbytes (imported directly here, and by peft whenever it is installed).
    On CPU it warns that an optional kernel for 4-bit *matmuls* is missing; neither NF4
    quantize/dequantize nor LoRA needs it, so the warning would only be noise in every training log."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@torch.no_grad()
def nf4_quantized_copy(model: torch.nn.Module, blocksize: int = 64, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """A copy with every nn.Linear weight (LM head skipped) quantized to 4-bit NormalFloat and back by
    bitsandbytes — the scheme a QLoRA / `load_in_4bit` deployment actually serves, and the one the
    quantization-attack paper used — so the attack does not rest on our own RTN code alone. Runs on CPU.
    `blocksize`: weights per absmax scale, over the flattened tensor (bitsandbytes accepts 32…4096)."""
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"NF4 blocksize must be a power of two in 32..4096, got {blocksize!r}")
    with quiet_bitsandbytes_import():
        import bitsandbytes.functional as bnb_functional

    clone = _copy_for_quantizing(model, skip)
    for module in _quantized_linears(clone, skip):
        weight = module.weight.data
        packed, state = bnb_functional.quantize_4bit(weight.float().contiguous(), blocksize=blocksize, quant_type="nf4")
        module.weight.data.copy_(bnb_functional.dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape))
    return clone
