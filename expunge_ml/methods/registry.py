"""Baseline unlearning methods by name.

Every module here exposes NAME, a frozen `Config`, `prepare(...) -> Plan` and
`unlearn(model, tokenizer, fmt, forget_records, retain_records, config, progress=None, **extra)`.
ULD (`expunge_ml.methods.uld`) has a different shape (it trains an assistant, not the model) and is
dispatched by the pipeline itself, so it is not listed here.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Mapping

from . import ga, graddiff, idkdpo, kl, npo, rmu, simnpo, whp

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (ga, graddiff, kl, npo, simnpo, idkdpo, rmu, whp)}


def get_method(name: str) -> ModuleType:
    key = name.strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def check_settings(config_cls: type, settings: Mapping[str, Any] | None, where: str) -> None:
    """Refuse settings that `config_cls` (a dataclass) has no field for, naming them and `where` they came
    from: a misspelt profile setting would otherwise be ignored or a bare TypeError mid-flow."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings or {}) - known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def make_config(name: str, overrides: Mapping[str, Any] | None = None):
    """The method's Config with `overrides` (e.g. from a profile); unknown keys are an error, not ignored."""
    config_cls = get_method(name).Config
    check_settings(config_cls, overrides, name)
    return config_cls(**dict(overrides or {}))


# A profile's `unlearning` section → method configs. Here, not in tasks/, so that a benchmark measuring a
# profile (`expunge benchmark documents --profile …`) builds exactly the configs a request would get.


def baseline_config_for(unlearning: Mapping[str, Any], method: str):
    """The profile's `baselines.defaults` with its `baselines.<method>` settings on top."""
    baselines = unlearning.get("baselines") or {}
    return make_config(method, {**(baselines.get("defaults") or {}), **(baselines.get(method) or {})})


def uld_config_for(unlearning: Mapping[str, Any], request_type: str):
    """The profile's `uld` settings with its `uld_by_request_type[request_type]` overrides on top."""
    from .uld import ULDConfig

    overrides = (unlearning.get("uld_by_request_type") or {}).get(request_type) or {}
    check_settings(ULDConfig, unlearning["uld"], "profile unlearning.uld (ULD)")
    check_settings(ULDConfig, overrides, f"profile unlearning.uld_by_request_type.{request_type} (ULD)")
    return ULDConfig(**{**unlearning["uld"], **overrides})
