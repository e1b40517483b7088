"""The ULD settings both benchmarks share, mapped onto `ULDConfig` in one place.

TofuBenchOptions and PIIBenchOptions keep their ULD settings as flat `uld_*` fields: their JSON reports
record them that way and `expunge benchmark quantization --from-tofu` reads them back by name. What the
two share (K, LoRA, w, τ, λ, lr, batch, schedule, seed) is read here; each benchmark passes what differs
(epochs, stopping loss, augmentation).
"""
from __future__ import annotations

from typing import Any

SHARED_FIELDS = {
    "n_layers": "uld_layers", "lora_r": "uld_lora_r", "lora_alpha": "uld_lora_alpha",
    "lora_dropout": "uld_lora_dropout", "weight": "uld_weight", "relative_top": "uld_relative_top",
    "retain_weight": "uld_retain_weight", "lr": "uld_lr", "batch_size": "uld_batch_size",
    "lr_schedule": "uld_lr_schedule", "seed": "seed",
}


def uld_config_from(options: Any, **specific: Any):
    """`ULDConfig` from a benchmark's options object plus its benchmark-specific fields."""
    from expunge_ml.methods.uld import ULDConfig

    shared = {name: getattr(options, field) for name, field in SHARED_FIELDS.items()}
    return ULDConfig(**shared, **specific)
