"""Values users give (flags, presets, sweep entries, policy and task fields): `key=value`
parsing, field types checked from a dataclass's annotations, sane integers and seeds. Refused in
one line before anything is built."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml

from streambench.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
INT_MAX = 2**53  # larger integers lose exactness in JSON readers and overflow numpy indices


def parse_assignments(items: tuple[str, ...] | list[str], flag: str) -> dict[str, Any]:
    """`key=value` pairs; values are YAML scalars (8, 0.9, true, text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"malformed {flag} '{item}': expected key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def _allowed_types(annotation) -> tuple[type, ...] | None:
    """int, float, str, bool and None from an annotation like `int | None`; None when the field
    holds something else (lists, mappings), which its own validation checks."""
    simple = (int, float, str, bool, type(None))
    if annotation in simple:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = typing.get_args(annotation)
        if all(p in simple for p in parts):
            return parts
    return None


def _describe_types(allowed: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return " or ".join(names[t] for t in allowed)


def check_field_types(cls, values: dict[str, Any], owner: str) -> None:
    """Every value has its field's declared type (an int field takes no string, bool or float),
    integers are of a sane size, numbers are finite: refused in one line before anything is built.
    Hyperparameters come from `-p`, presets and sweep specs, all of them user input."""
    import numpy as np

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in values:
            continue
        allowed = _allowed_types(hints.get(f.name))
        if allowed is None:
            continue
        value = values[f.name]
        if isinstance(value, np.integer):
            value = values[f.name] = int(value)
        ok = False
        if value is None:
            ok = type(None) in allowed
        elif isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
            if ok and abs(value) > INT_MAX:
                raise ConfigError(f"{owner}: {f.name} = {value} is out of range (at most 2^53)")
        elif isinstance(value, float):
            ok = float in allowed
            if ok and not math.isfinite(value):
                raise ConfigError(f"{owner}: {f.name} must be finite, got {value!r}")
        elif isinstance(value, str):
            ok = str in allowed
        if not ok:
            raise ConfigError(f"{owner}: {f.name} must be {_describe_types(allowed)}, got {value!r}")


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    return seed
