"""Unlearning methods by name, and what each one trains.

Two kinds of method:
- `FULL_MODEL` (GA, NPO, …): edits a copy of the model's weights. The module exposes NAME, a frozen
  `Config`, `prepare(...) -> Plan` and `unlearn(model, tokenizer, fmt, forget_records, retain_records,
  config, progress=None, **extra)`.
- `ASSISTANT` (ULD): trains a small LoRA assistant that the served model subtracts from the base's logits;
  the base's weights stay as they are (`expunge_ml.methods.uld`, data from `expunge_ml.uld_data`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from . import ga, graddiff, idkdpo, kl, npo, rmu, simnpo, uld, whp

FULL_MODEL, ASSISTANT = "full_model", "assistant"


@dataclass(frozen=True)
class Method:
    name: str
    module: ModuleType
    trains: str  # FULL_MODEL or ASSISTANT
    config_class: type


METHODS: dict[str, Method] = {
    "uld": Method("uld", uld, ASSISTANT, uld.ULDConfig),
    **{m.NAME: Method(m.NAME, m, FULL_MODEL, m.Config) for m in (ga, graddiff, kl, npo, simnpo, idkdpo, rmu, whp)},
}
# The methods that edit the model's own weights, each with `unlearn(...)`.
BASELINES: tuple[str, ...] = tuple(sorted(name for name, m in METHODS.items() if m.trains == FULL_MODEL))


def method_entry(name: str) -> Method:
    key = name.strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def get_method(name: str) -> ModuleType:
    """The method's module (for a baseline: the one with `unlearn`)."""
    return method_entry(name).module


def check_settings(config_cls: type, settings: Mapping[str, Any] | None, where: str) -> None:
    """Refuse settings that `config_cls` (a dataclass) has no field for, naming them and `where` they came
    from: a misspelt profile setting would otherwise be ignored or a bare TypeError mid-flow."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings or {}) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def make_config(name: str, overrides: Mapping[str, Any] | None = None):
    """The method's config with `overrides` (e.g. from a profile); unknown keys are an error, not ignored."""
    config_cls = method_entry(name).config_class
    check_settings(config_cls, overrides, name)
    return config_cls(**dict(overrides or {}))


# A profile's `unlearning` section → method configs. Here, not in tasks/, so that a benchmark measuring a
# profile (`expunge benchmark documents --profile …`) builds exactly the configs a request would get.


def config_for(method: str, unlearning: Mapping[str, Any], request_type: str):
    """The config a request of `request_type` gets for `method` from a profile's `unlearning` section."""
    if method_entry(method).name == "uld":
        return uld_config_for(unlearning, request_type)
    return baseline_config_for(unlearning, method)


def baseline_config_for(unlearning: Mapping[str, Any], method: str):
    """The profile's `baselines.defaults` with its `baselines.<method>` settings on top."""
    baselines = unlearning.get("baselines") or {}
    return make_config(method, {**(baselines.get("defaults") or {}), **(baselines.get(method) or {})})


def uld_config_for(unlearning: Mapping[str, Any], request_type: str):
    """The profile's `uld` settings with its `uld_by_request_type[request_type]` overrides on top."""
    overrides = (unlearning.get("uld_by_request_type") or {}).get(request_type) or {}
    check_settings(uld.ULDConfig, unlearning["uld"], "profile unlearning.uld (ULD)")
    check_settings(uld.ULDConfig, overrides, f"profile unlearning.uld_by_request_type.{request_type} (ULD)")
    return uld.ULDConfig(**{**unlearning["uld"], **overrides})
