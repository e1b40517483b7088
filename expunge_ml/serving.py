"""What a model version serves: its base, checked against the weight hash it was pinned with, alone or with
ULD assistants subtracted from its logits. The pipeline's tasks and the registered MLflow model build it here,
so what was evaluated is what is served."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .evidence import ServedModel
from .methods.uld import load_assistant
from .modeling import load_causal_lm, weights_fingerprint


class BaseWeightsMismatch(RuntimeError):
    """The base model found at a location is not the one a version was built on."""


@dataclass(frozen=True)
class Adapter:
    """One assistant as served: its adapter directory and its w (None: the w saved with the adapter); `key` opens
    a sealed one (`expunge_ml.sealed`)."""

    path: str
    weight: float | None = None
    key: bytes | None = field(default=None, repr=False)


def check_base_weights(location: str | Path, expected_sha256: str | None) -> None:
    """Raise when the local directory `location` holds other weights than `expected_sha256`. Nothing to check
    without a pinned hash, or for a hub id (its weights are not on disk yet)."""
    if not expected_sha256 or not Path(location).is_dir():
        return
    actual = weights_fingerprint(Path(location))
    if actual != expected_sha256:
        raise BaseWeightsMismatch(f"base model at {location} has weights {actual[:12]}…, "
                                  f"pinned {expected_sha256[:12]}…")


def load_base(location: str | Path, expected_sha256: str | None = None, *, device: str = "cpu",
              dtype: str = "float32"):
    """(model, tokenizer) of the base at `location`, after checking its weights against `expected_sha256`."""
    check_base_weights(location, expected_sha256)
    return load_causal_lm(str(location), dtype=dtype, device=device)


def served_model(base, adapters: Sequence[Adapter] = (), relative_top: float | None = None) -> ServedModel:
    """The base alone, or base + Σ w·assistant over `adapters` (every erasure so far, oldest first).
    `relative_top`: the composite's τ; None takes the newest adapter's own."""
    loaded = [load_assistant(base, Path(adapter.path), adapter.key) for adapter in adapters]
    weights = [float(adapter.weight) if adapter.weight is not None else config.weight
               for adapter, (_, config) in zip(adapters, loaded)]
    if relative_top is None:
        relative_top = loaded[-1][1].relative_top if loaded else 0.0
    return ServedModel(base, [model for model, _ in loaded], weights, float(relative_top))
