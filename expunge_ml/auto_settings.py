"""ULD settings derived from the target model itself, for a profile that says `auto` (expunge/profiles/auto.yaml).

A user's model is not the sample model: a value tuned on a 4-layer model trained from scratch wrecks a real
pre-trained LM (w −1.5 took 28–40 % of the neighbours' answers from SmolLM2). The pipeline reads the base's
depth, size and vocabulary and picks each `auto` value by the rule in `AUTO_RULES`; the values are the ones
measured on the two shipped bases (profiles `smollm2` and `demo`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

AUTO = "auto"
# A base this deep is a general pre-trained LM, not a small model that memorised its corpus.
PRETRAINED_MIN_LAYERS = 12


@dataclass(frozen=True)
class ModelTraits:
    """What the derivation reads of a base."""

    n_layers: int
    hidden_size: int
    vocab_size: int
    n_parameters: int
    has_chat_template: bool

    @property
    def pretrained(self) -> bool:
        return self.n_layers >= PRETRAINED_MIN_LAYERS


def traits_of(model: torch.nn.Module, tokenizer) -> ModelTraits:
    config = model.config
    return ModelTraits(
        n_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
        vocab_size=int(model.get_output_embeddings().out_features),
        n_parameters=sum(p.numel() for p in model.parameters()),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def _assistant_layers(t: ModelTraits) -> int:
    return max(2, round(0.13 * t.n_layers)) if t.n_layers > 2 else t.n_layers


def _batch_size(t: ModelTraits) -> int:
    return 8 if t.n_parameters <= 500_000_000 else 4 if t.n_parameters <= 3_000_000_000 else 2


# setting → (rule in words, for the README and the training record; how to compute it)
AUTO_RULES: dict[str, tuple[str, Any]] = {
    "n_layers": ("13 % of the base's layers, at least 2 (SmolLM2: 4 of 30; the 4-layer sample model: 2)",
                 _assistant_layers),
    "weight": ("-0.5 on a pre-trained LM (12+ layers), -1.5 on a small model that memorised its corpus",
               lambda t: -0.5 if t.pretrained else -1.5),
    "relative_top": ("0.01 on a pre-trained LM (only tokens it finds plausible), 0 on a small memorising model "
                     "(its plausible set is the one memorised token)", lambda t: 0.01 if t.pretrained else 0.0),
    "batch_size": ("8 up to 500 M parameters, 4 up to 3 B, then 2", _batch_size),
    "general_retain": ("64 general-knowledge questions kept uniform on a pre-trained LM, none on a small model "
                       "(it knows no general text)", lambda t: 64 if t.pretrained else 0),
}


def resolve_auto(uld: Mapping[str, Any], traits: ModelTraits) -> tuple[dict[str, Any], dict[str, Any]]:
    """`uld` with every `auto` value replaced by its rule's value for `traits`, and what was derived
    ({setting: value}); a setting without a rule cannot be `auto`."""
    resolved, derived = dict(uld), {}
    for key, value in uld.items():
        if value != AUTO:
            continue
        if key not in AUTO_RULES:
            raise ValueError(f"ULD setting {key!r} cannot be 'auto'; these can: {', '.join(AUTO_RULES)}")
        resolved[key] = derived[key] = AUTO_RULES[key][1](traits)
    return resolved, derived


def auto_unlearning(unlearning: Mapping[str, Any], traits: ModelTraits) -> tuple[dict[str, Any], dict[str, Any]]:
    """The profile's `unlearning` section with `auto` resolved in `uld` and each `uld_by_request_type` entry;
    and a record of the derivation (the traits and the values) for training.json."""
    resolved = dict(unlearning)
    resolved["uld"], derived = resolve_auto(unlearning.get("uld") or {}, traits)
    by_type = {}
    for request_type, overrides in (unlearning.get("uld_by_request_type") or {}).items():
        by_type[request_type], extra = resolve_auto(overrides, traits)
        derived.update({f"{request_type}.{k}": v for k, v in extra.items()})
    if by_type:
        resolved["uld_by_request_type"] = by_type
    return resolved, ({"traits": asdict(traits), "values": derived} if derived else {})
