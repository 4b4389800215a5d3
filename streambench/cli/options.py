"""Options several commands share, declared once: policy arguments, device and dtype; and the
one way a command turns policy names and `-p` arguments into policy specs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

policy_arg_option = click.option(
    "-p",
    "--policy-arg",
    "policy_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Policy argument, e.g. -p start_size=8 or -p sirllm.decay=0.9 (repeatable).",
)


def device_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--device and --dtype, as every command that loads a model takes them."""
    fn = click.option(
        "--dtype",
        default="auto",
        show_default=True,
        help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16.",
    )(fn)
    return click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(fn)


def policy_specs(names: list[str], policy_args: tuple[str, ...]) -> list[Any]:
    """Policy names, presets or plugin references plus `-p` arguments (`key=value` for all of
    them, `name.key=value` for one) -> checked PolicySpecs."""
    from streambench.policies.build import apply_overrides, resolve_policy
    from streambench.values import parse_assignments

    overrides = parse_assignments(policy_args, "-p")
    specs = [resolve_policy(n.strip(), overrides) for n in names if n.strip()]
    apply_overrides(specs, overrides)
    return specs
