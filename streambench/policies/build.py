"""From a policy name or preset and its arguments to a built, checked policy: the one place a
budget meets a policy's own sizes. Used by runs, sweeps, chat, the lm-eval model and tasks that
build a second policy (mtbench's dense shadow)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from streambench.errors import ConfigError
from streambench.presets import PRESET_META, find_preset, load_preset, same_name_defaults
from streambench.values import check_field_types


@dataclass
class PolicySpec:
    name: str  # registered policy name
    args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # preset name, when it came from one
    preset: tuple[str, ...] = ()  # the args the preset file fixed (not -p or a sweep entry's own)

    @property
    def display(self) -> str:
        return self.label or self.name


def resolve_policy(name: str, overrides: dict[str, Any]) -> PolicySpec:
    """A policy name or preset, with `-p` overrides applied (`policy.key` targets one policy)."""
    from streambench.policies import POLICIES

    args: dict[str, Any] = {}
    label = None
    if name in POLICIES:
        args = {
            k: v
            for k, v in same_name_defaults(name, "policies", "policy", POLICIES.get(name).name).items()
            if k not in PRESET_META
        }
    else:
        preset = find_preset(name, "policies")
        if preset is None:
            POLICIES.get(name)  # raises with a did-you-mean hint
            raise ConfigError(f"unknown policy '{name}'")
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
    if policy.budget is None and cls.sizes and _sizes_given(cls, args):
        raise ConfigError(
            f"{spec.display}: its sizes ({', '.join(cls.sizes)}) are all given, but configure() derives no budget "
            "from them, so it would run as dense; derive it there (self._split_budget, policies/base.py)"
        )
    asked = args.get("budget")
    if asked is not None and policy.budget is not None and policy.budget != asked:  # (dense: no budget at all)
        raise ConfigError(
            f"{spec.display}: its arguments make a budget of {policy.budget}, not the {asked} asked for "
            f"({', '.join(f'{k}={v}' for k, v in spec.args.items()) or 'no arguments'})"
        )
    return policy


def _sizes_given(cls, args: dict[str, Any]) -> bool:
    """True when the args fix the budget themselves (window size, or every size of a split)."""
    sizes = set(getattr(cls, "sizes", ()))  # declared by the policy (CachePolicy.sizes)
    return bool(sizes) and sizes <= args.keys()
