"""A benchmark run's settings from a YAML file: `expunge benchmark NAME --config run.yaml`.

Each benchmark's options are a frozen dataclass whose fields may nest other frozen dataclasses (its ULD
settings are an `expunge_ml.methods.uld.ULDConfig`, the one the pipeline trains with). A YAML file names
only what differs from the defaults; nested sections merge field by field. A key the options do not have is
an error naming it, so a misspelt setting never silently runs the default.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_dataclass(annotation: Any) -> type | None:
    """The dataclass a field holds (also inside `X | None`), or None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _coerce(annotation: Any, value: Any) -> Any:
    """YAML gives lists and strings: turn them into the tuples and paths the options declare."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is Path or Path in args:
        return Path(value)
    if origin is tuple or (args and typing.get_origin(args[0]) is tuple):
        return tuple(value) if isinstance(value, (list, tuple)) else tuple(str(value).split(",")) if value else ()
    return value


def merge(current: T, changes: Mapping[str, Any], where: str = "config") -> T:
    """`current` (a dataclass instance) with `changes` applied; nested mappings merge into nested dataclasses."""
    if not isinstance(changes, Mapping):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(changes).__name__}")
    types = _field_types(type(current))
    unknown = sorted(set(changes) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(types))}")
    updates = {}
    for name, value in changes.items():
        nested = _nested_dataclass(types[name])
        if nested is not None and isinstance(value, Mapping):
            inner = getattr(current, name)
            updates[name] = merge(inner if inner is not None else nested(), value, f"{where}.{name}")
        else:
            updates[name] = _coerce(types[name], value)
    return dataclasses.replace(current, **updates)


def dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"uld.weight": -1.5} → {"uld": {"weight": -1.5}}: command-line flags as a nested mapping."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a benchmark config is a mapping of settings")
    return data


def load_options(defaults: T, path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """`defaults` with the YAML file at `path` on top, then `overrides` (dotted keys allowed) on top of that."""
    options = merge(defaults, read_yaml(path), str(path)) if path else defaults
    return merge(options, dotted(overrides or {}), "command line") if overrides else options


def as_yaml(options: Any) -> str:
    """The options as the YAML `--config` reads back (paths as strings, tuples as lists)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return yaml.safe_dump(plain(options), sort_keys=False)
