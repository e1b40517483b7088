"""Where models run: CPU or a CUDA GPU, chosen once by name and followed by every batch.

Collation and tokenisation stay on the CPU; a model call moves its inputs to the model's own device,
so the same code trains and evaluates on either, and a ULD composite works as long as its base and
assistants sit on one device (the assistant is a copy of the base's first layers, so it does).
"""
from __future__ import annotations

from typing import Any

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Weight precisions a base can be loaded in. float32 is the default because the embedded models are tiny
# and trained here; a user's multi-billion-parameter base on a GPU wants bfloat16 (half the memory).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | None = "auto") -> torch.device:
    """"auto": the first CUDA GPU when torch sees one, else the CPU; "cpu"; "cuda" or "cuda:N".

    Asking for CUDA on a machine without it is an error rather than a silent CPU run: a platform engineer
    who scheduled a GPU job should learn that the GPU was missing, not find a run 50× slower."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but torch {torch.__version__} sees no CUDA GPU here")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def resolve_dtype(name: str | torch.dtype | None = "float32") -> torch.dtype:
    """"float32" | "bfloat16" | "float16" (or a torch dtype, returned as is)."""
    if isinstance(name, torch.dtype):
        return name
    key = (name or "float32").strip().lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch; collation happens on CPU, the model may not be there."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class PeakDeviceMemory:
    """Peak CUDA memory allocated (MB) while the block runs, over what was allocated at entry; 0 on CPU
    (the caller measures host memory there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakDeviceMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
