"""Run configuration: defaults, then a YAML preset, then command-line flags.

Presets are flat YAML files whose keys are the fields of a policy or task:

    # policies/streamingllm.yaml
    policy: streamingllm
    version: 1
    start_size: 4

`include: other.yaml` (relative to the file) loads another preset first, so a variant is a few
lines. Presets are looked up by name in `./policies` (or `./tasks`), then in the folders shipped
next to the package, then as a file path.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streambench.errors import ConfigError

PRESET_META = ("policy", "task", "version", "include", "description")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
INT_MAX = 2**53  # larger integers lose exactness in JSON readers and overflow numpy indices
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PolicySpec:
    name: str  # registered policy name
    args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # preset name, when it came from one
    preset: tuple[str, ...] = ()  # the args the preset file fixed (not -p or a sweep entry's own)

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    budget: int | str | None = None  # None: the task's default_budget; "25%": a share of the task's context
    policies: list[PolicySpec] = field(default_factory=list)
    task: str = "perplexity"
    task_args: dict[str, Any] = field(default_factory=dict)
    out: str = "results"
    cuda_graphs: bool | None = None  # None: on where the device is CUDA (one-token steps as CUDA graphs)
    device_map: str | None = None  # "auto": spread the model's layers over the GPUs (accelerate)
    batch_size: int = 1  # streams per batch (tasks with several streams: perplexity over several texts)


def preset_dirs(kind: str) -> list[Path]:
    return [Path.cwd() / kind, _REPO_ROOT / kind]


def list_presets(kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in reversed(preset_dirs(kind)):  # cwd wins
        if folder.is_dir():
            for f in sorted(folder.glob("*.yaml")):
                found[f.stem] = f
    return found


def find_preset(name_or_path: str, kind: str) -> Path | None:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file not found: {name_or_path}")
        return path
    return list_presets(kind).get(name_or_path)


def load_preset(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving `include:` chains (cycles are an error)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"preset include cycle: {' -> '.join(p.name for p in (*_seen, path))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in preset {path.name}: {str(exc).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read preset {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path.name} must be a mapping of keys to values")
    if not all(isinstance(k, str) for k in data):
        raise ConfigError(f"preset {path.name}: keys must be strings, got {[k for k in data if not isinstance(k, str)][:3]}")
    for key in ("policy", "task", "include", "description"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"preset {path.name}: '{key}' must be a string, got {data[key]!r}")
    if "version" in data and (isinstance(data["version"], bool) or not isinstance(data["version"], int)):
        raise ConfigError(f"preset {path.name}: 'version' must be an integer, got {data['version']!r}")
    base: dict[str, Any] = {}
    if "include" in data:
        base = load_preset(path.parent / data["include"], (*_seen, path))
    base.update({k: v for k, v in data.items() if k != "include"})
    return base


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


def resolve_policy(name: str, overrides: dict[str, Any]) -> PolicySpec:
    """A policy name or preset, with `-p` overrides applied (`policy.key` targets one policy)."""
    from streambench.policies import POLICIES

    args: dict[str, Any] = {}
    label = None
    if name not in POLICIES:
        preset = find_preset(name, "policies")
        if preset is None:
            POLICIES.get(name)  # raises with a did-you-mean hint
        data = load_preset(preset)
        if "policy" not in data:
            raise ConfigError(f"preset {preset.name} names no policy (add 'policy: <name>')")
        POLICIES.get(data["policy"])
        args = {k: v for k, v in data.items() if k not in PRESET_META}
        label, name = preset.stem, data["policy"]
    return PolicySpec(name, args, label, tuple(args))


def apply_overrides(specs: list[PolicySpec], overrides: dict[str, Any]) -> None:
    """Route each `-p` key to the policies that have that field; unknown keys are an error."""
    from streambench.policies import POLICIES

    for key, value in overrides.items():
        target, _, field_name = key.rpartition(".")
        hit = False
        for spec in specs:
            if target and target not in (spec.name, spec.label):
                continue
            fields = {f.name for f in dataclasses.fields(POLICIES.get(spec.name)) if f.init}
            if field_name in fields:
                spec.args[field_name] = value
                spec.preset = tuple(k for k in spec.preset if k != field_name)
                hit = True
        if not hit:
            names = ", ".join(sorted({s.display for s in specs}))
            raise ConfigError(f"no selected policy ({names}) takes the argument '{key}'")


def parse_budget(value, where: str = "budget"):
    """A budget as given: a positive integer (keys), "25%" (a share of the task's context,
    resolved by `resolve_budget`), or None. Returns an int, a float share in (0, 1], or None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                share = float(text[:-1]) / 100 if text.isascii() else float("nan")
            except ValueError:
                share = float("nan")
            if not 0 < share <= 1:
                raise ConfigError(f"{where} {value!r}: a ratio budget is a percentage in (0, 100], e.g. 25%")
            return share
        if text.isascii() and text.isdigit():  # (str.isdigit also takes '²' and other scripts' digits)
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer or a percentage (25%), got {value!r}")
    return value


def resolve_budget(value, task) -> tuple[int | None, dict]:
    """(keys, what to record): a share becomes round(share x the task's context tokens), at least 1
    (kvpress's compression ratio is 1 - share). Tasks that cannot know their context before they
    run (the dialogue tasks) refuse a share."""
    parsed = parse_budget(value)
    if not isinstance(parsed, float):
        return parsed, {}
    context = task.context_tokens()
    if context is None:
        raise ConfigError(f"budget {value}: task {task.name} does not know its context length before it runs; "
                          "give the budget in keys")
    keys = max(1, round(parsed * context))
    return keys, {"ratio": parsed, "context_tokens": context, "compression_ratio": round(1 - keys / context, 6), "keys": keys}


def build_policy(spec: PolicySpec, budget: int | None, explicit: bool = False):
    """Instantiate and validate a policy. The run's budget applies unless the args fix the sizes
    (`-p recent_size=252` alone fixes it). A budget the user gave (`explicit`) applies even then,
    so sizes given with it (`-p`, a sweep entry) that add up to another budget are refused, never
    silently preferred; only a preset that fixes every size itself (streamingllm-4-252: its name
    is its budget) keeps its own."""
    from streambench.policies import POLICIES

    cls = POLICIES.get(spec.name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, spec.args)) - fields)
    if unknown:
        raise ConfigError(f"{spec.name}: unknown argument(s) {', '.join(unknown)} (takes {', '.join(sorted(fields))})")
    args = dict(spec.args)
    preset_fixes = _sizes_given(cls, {k: args[k] for k in spec.preset if k in args})
    if "budget" not in args and (not _sizes_given(cls, args) or (explicit and not preset_fixes)):
        args["budget"] = budget
    check_field_types(cls, args, spec.name)
    if isinstance(args.get("budget"), int) and args["budget"] < 1:
        raise ConfigError(f"{spec.name}: budget must be >= 1, got {args['budget']}")
    policy = cls(**args)
    asked = args.get("budget")
    if asked is not None and policy.budget is not None and policy.budget != asked:  # (dense: no budget at all)
        raise ConfigError(f"{spec.display}: its arguments make a budget of {policy.budget}, not the {asked} asked for "
                          f"({', '.join(f'{k}={v}' for k, v in spec.args.items()) or 'no arguments'})")
    return policy


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


def _sizes_given(cls, args: dict[str, Any]) -> bool:
    """True when the args fix the budget themselves (window size, or every size of a split)."""
    sizes = set(getattr(cls, "sizes", ()))  # declared by the policy (CachePolicy.sizes)
    return bool(sizes) and sizes <= args.keys()


def build_task(name: str, args: dict[str, Any]):
    from streambench.tasks import TASKS

    data: dict[str, Any] = {}
    if name not in TASKS:
        preset = find_preset(name, "tasks")
        if preset is None:
            TASKS.get(name)
        data = load_preset(preset)
        name = data.get("task") or TASKS.get(name)
    cls = TASKS.get(name)
    merged = {k: v for k, v in data.items() if k not in PRESET_META}
    merged.update(args)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, merged)) - fields)
    if unknown:
        raise ConfigError(f"{cls.name}: unknown argument(s) {', '.join(unknown)} (takes {', '.join(sorted(fields))})")
    check_field_types(cls, merged, cls.name)
    return cls(**merged)
