"""Run configuration: defaults, then a YAML preset (streambench/presets), then command-line flags.
A `RunConfig` is what `streambench.run` takes; the budget as given (keys or a share) is parsed
here and resolved against the task once, in the plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streambench.engine.cache.quant import DEFAULT_GROUP
from streambench.errors import ConfigError
from streambench.policies.build import PolicySpec


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
    # evictions chosen and applied on the device (engine/cache/device_steps.py); None: on with
    # CUDA. Speed only (the same keep-sets): not in the config hash; the result's info says which ran
    device_steps: bool | None = None
    device_map: str | None = None  # "auto": spread the model's layers over the GPUs (accelerate)
    batch_size: int = 1  # streams per batch (tasks with several streams: perplexity over several texts)
    task_defaults: dict[str, Any] = field(default_factory=dict)  # below task_args: the task's run_defaults
    # the KV cache's bits per value, one run per width and policy (16: unquantized, the model's
    # dtype; 8/4/2: per-token groups of kv_group channels, engine/cache/quant.py)
    kv_bits: list[int] = field(default_factory=lambda: [16])
    kv_group: int = DEFAULT_GROUP
    kv_method: str = "token"  # or "kivi": keys per channel in blocks of kv_group tokens
    kv_residual: int | None = None  # recent tokens in full precision (None: 0 token, 128 kivi)
    # runs over the same stream share one batch where that is faster and exact (runs/grouping.py)
    group: bool = True


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
        raise ConfigError(
            f"budget {value}: task {task.name} does not know its context length before it runs; give the budget in keys"
        )
    keys = max(1, round(parsed * context))
    return keys, {
        "ratio": parsed,
        "context_tokens": context,
        "compression_ratio": round(1 - keys / context, 6),
        "keys": keys,
    }
