"""Sweeps: models x tasks x budgets x policies, expanded into runs; every finished run is committed
to the store at once, runs already finished with the same config hash are skipped (resume), and a
failing run is recorded with its error while the others go on.

    # sweep.yaml
    models: [smollm2-135m]
    budgets: [64, 128]
    policies: [dense, window, streamingllm, {policy: sirllm, decay: 0.9}, streamingllm-4-252]
    tasks: [{task: perplexity, tokens: 512}]
    store: results/sweep.sqlite
    out: results/sweep
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streambench.engine.cache.quant import DEFAULT_GROUP, parse_bits
from streambench.errors import ConfigError, OutputError, StreambenchError
from streambench.policies.build import PolicySpec, resolve_policy
from streambench.presets import PRESET_META, load_preset
from streambench.runs.config import RunConfig, parse_budget
from streambench.sanitize import check_label

SPEC_KEYS = {
    "models",
    "model",
    "budgets",
    "budget",
    "policies",
    "tasks",
    "task",
    "device",
    "dtype",
    "seed",
    "store",
    "out",
    "version",
    "description",
    "include",
    "resources",
    "retries",
    "batch_size",
    "device_map",
    "kv_bits",
    "kv_group",
    "kv_method",
    "kv_residual",
    "group",
}
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")  # what each run asks a Ray cluster for


@dataclass
class SweepSpec:
    models: list[str]
    tasks: list[tuple[str, dict]]
    budgets: list[int | str | None]  # "25%": a share of each task's context
    policies: list[PolicySpec]
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    store: str = "results/streambench.sqlite"
    out: str = "results"
    resources: dict[str, Any] | None = None  # per run, on a Ray cluster: num_cpus, num_gpus, memory
    retries: int = 2  # a run that fails on a Ray cluster (error, node died) is tried this many more times
    batch_size: int = 1
    device_map: str | None = None
    kv_bits: list[int] = field(default_factory=lambda: [16])  # one run per width (16: unquantized)
    kv_group: int = DEFAULT_GROUP
    kv_method: str = "token"
    kv_residual: int | None = None
    group: bool = True  # runs over one stream share a batch where faster and exact (runs/grouping.py)
    # (config, its plan) for every run of the matrix, made once by load_spec when it validates
    plans: list[tuple[RunConfig, Any]] = field(default_factory=list, repr=False, compare=False)
    planned_for_device: bool = field(default=True, repr=False, compare=False)

    def runs(self) -> list[RunConfig]:
        """One RunConfig per (model, task, budget), each with every policy."""
        return [
            RunConfig(
                model=m,
                device=self.device,
                dtype=self.dtype,
                seed=self.seed,
                budget=b,
                policies=[PolicySpec(p.name, dict(p.args), p.label, p.preset) for p in self.policies],
                task=t,
                task_args=dict(args),
                out=self.out,
                batch_size=self.batch_size,
                device_map=self.device_map,
                kv_bits=list(self.kv_bits),
                kv_group=self.kv_group,
                kv_method=self.kv_method,
                kv_residual=self.kv_residual,
                group=self.group,
            )
            for m in self.models
            for t, args in self.tasks
            for b in self.budgets
        ]


def load_spec(path: str | Path, check_device: bool = True) -> SweepSpec:
    data = load_preset(Path(path))
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"sweep spec {Path(path).name}: unknown key(s) {', '.join(unknown)}")
    models = _as_list(data.get("models", data.get("model", "smollm2-135m")), "models")
    for m in models:
        if not isinstance(m, str) or not m.strip():
            raise ConfigError(f"sweep spec: models are names, folders or files (strings), got {m!r}")
    budgets = _as_list(data.get("budgets", data.get("budget")), "budgets")
    for b in budgets:
        parse_budget(b, "sweep spec: budget")
    for key in ("device", "dtype", "store", "out"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"sweep spec: {key} must be a string, got {data[key]!r}")
    raw_bits = data.get("kv_bits", [16])
    kv_bits = parse_bits(raw_bits if isinstance(raw_bits, list | str) else [raw_bits], "sweep spec: kv_bits")
    for key in ("seed", "batch_size", "kv_group"):
        if key in data and (isinstance(data[key], bool) or not isinstance(data[key], int)):
            raise ConfigError(f"sweep spec: {key} must be an integer, got {data[key]!r}")
    policies = [_policy(p) for p in _as_list(data.get("policies"), "policies")]
    tasks = [_task(t) for t in _as_list(data.get("tasks", data.get("task", "perplexity")), "tasks")]
    if not policies:
        raise ConfigError("sweep spec names no policies")
    retries = data.get("retries", 2)
    group = data.get("group", True)
    if not isinstance(group, bool):
        raise ConfigError(f"sweep spec: group must be true or false, got {group!r}")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConfigError(f"sweep spec: retries must be an integer >= 0, got {retries!r}")
    spec = SweepSpec(
        models,
        tasks,
        budgets,
        policies,
        data.get("device", "auto"),
        data.get("dtype", "auto"),
        data.get("seed", 0),
        data.get("store", "results/streambench.sqlite"),
        data.get("out", "results"),
        _resources(data.get("resources")),
        retries,
        data.get("batch_size", 1),
        data.get("device_map"),
        kv_bits,
        data.get("kv_group", DEFAULT_GROUP),
        data.get("kv_method", "token"),
        data.get("kv_residual"),
        group,
    )
    from streambench.runs.runner import plan

    # validate every policy, task and size now, before any model loads; the plans are kept
    spec.plans = [(config, plan(config, check_device=check_device)) for config in spec.runs()]
    spec.planned_for_device = check_device
    return spec


def _resources(value: Any) -> dict[str, Any] | None:
    """`resources: {num_gpus: 1, num_cpus: 4, memory: 16GiB}` -> Ray's task options."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"sweep spec: resources is a mapping of {', '.join(RESOURCE_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"sweep spec: unknown resource(s) {', '.join(unknown)} (use {', '.join(RESOURCE_KEYS)})")
    out: dict[str, Any] = {}
    for key, amount in value.items():
        if key == "memory":
            amount = parse_bytes(amount)
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"sweep spec: resources.{key} must be a number >= 0, got {amount!r}")
        out[key] = amount
    return out


def parse_bytes(value: Any) -> int:
    """8GiB, 512MiB, 2GB or a plain number of bytes."""
    import re

    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ConfigError(f"sweep spec: memory must look like 8GiB or 512MB, got {value!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper().rstrip("B") or "B"
    scale = {
        "B": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }[unit]
    return int(number * scale)


def _as_list(value: Any, key: str) -> list:
    if value is None:
        return [None]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _policy(item: Any) -> PolicySpec:
    if isinstance(item, str):
        return resolve_policy(item, {})
    if isinstance(item, dict) and "policy" in item:
        if not isinstance(item["policy"], str):
            raise ConfigError(f"sweep spec: 'policy' is a policy or preset name, got {item['policy']!r}")
        spec = resolve_policy(item["policy"], {})
        own = {k: v for k, v in item.items() if k not in PRESET_META and k != "label"}
        spec.args.update(own)
        spec.preset = tuple(k for k in spec.preset if k not in own)
        spec.label = check_label(item.get("label", spec.label), f"sweep spec: label of {item['policy']}")
        return spec
    raise ConfigError(f"sweep spec: a policy is a name or a mapping with 'policy:', got {item!r}")


def _task(item: Any) -> tuple[str, dict]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and "task" in item:
        if not isinstance(item["task"], str):
            raise ConfigError(f"sweep spec: 'task' is a task or preset name, got {item['task']!r}")
        return item["task"], {k: v for k, v in item.items() if k not in PRESET_META}
    raise ConfigError(f"sweep spec: a task is a name or a mapping with 'task:', got {item!r}")


def pending(spec: SweepSpec, store, force: bool, counts: dict[str, int], report, configs=None, check_device=True):
    """Per model: the planned runs (config, item) and those still to do (not in the store)."""
    from streambench.runs import runner

    done = set() if force else store.finished()
    seen: set[str] = set()
    if configs is None and spec.plans and spec.planned_for_device == check_device:
        plans = {id(c): p for c, p in spec.plans}  # planned once, when the spec was loaded
        configs = [c for c, _ in spec.plans]
    else:
        configs = spec.runs() if configs is None else configs
        plans = {id(c): runner.plan(c, check_device=check_device) for c in configs}
    for model in spec.models:
        mine = [c for c in configs if c.model == model]
        planned = [(c, p) for c in mine for p in plans[id(c)].runs]
        todo = []
        for config, item in planned:
            if item.digest in seen:
                continue  # the same run twice in the matrix (dense ignores the budget)
            seen.add(item.digest)
            if item.digest in done:
                counts["skipped"] += 1
                report("skipped", {"run_id": item.run_id})
            else:
                todo.append((config, item))
        yield model, [(c, plans[id(c)]) for c in mine], planned, todo


def run_sweep(
    spec: SweepSpec,
    store,
    force: bool = False,
    progress=None,
    report: Callable[[str, dict], None] = lambda event, info: None,
) -> dict[str, int]:
    """Run what the store does not hold yet, in this process; returns counts of finished, failed
    and skipped runs. (`streambench.runs.ray_sweep` runs the same matrix on a Ray cluster.) Each run is
    claimed in the store before it is computed, so a second sweep on the same store skips it; an
    output that cannot be written stops the sweep with store and JSON folder agreeing."""
    from streambench.models import loading as models
    from streambench.runs import runner

    counts = {"finished": 0, "failed": 0, "skipped": 0, "elsewhere": 0}
    for model, configs, planned, todo in pending(spec, store, force, counts, report):
        if not todo:
            continue
        try:
            lm = models.load(model, spec.device, spec.dtype, device_map=spec.device_map)
        except StreambenchError as exc:
            for _, item in todo:
                _stored(
                    store,
                    spec,
                    counts,
                    lambda i=item, why=str(exc): store.add_failure(i.config, i.digest, i.run_id, i.spec.display, why),
                )
                counts["failed"] += 1
                report("failed", {"run_id": item.run_id, "error": str(exc)})
            continue

        def failed(item, exc, _counts=counts):
            message = (
                str(exc)
                if isinstance(exc, StreambenchError)
                else "".join(traceback.format_exception_only(type(exc), exc)).strip()
            )
            _stored(
                store,
                spec,
                _counts,
                lambda: store.add_failure(item.config, item.digest, item.run_id, item.spec.display, message),
            )
            _counts["failed"] += 1
            report("failed", {"run_id": item.run_id, "error": message})

        def claim(item, _counts=counts):
            if store.claim(item.digest, force=force):
                return True
            _counts["elsewhere"] += 1
            report("elsewhere", {"run_id": item.run_id})
            return False

        wanted = {item.digest for _, item in todo}
        for config, made in configs:
            skip = frozenset(item.digest for c, item in planned if c is config and item.digest not in wanted)
            try:
                for result in runner.run(
                    config,
                    progress or runner.silent,
                    lm=lm,
                    skip=skip,
                    on_error=failed,
                    claim=claim,
                    planned=made,
                ):
                    _stored(store, spec, counts, lambda r=result: store.add(r), result)
                    wanted.discard(result["config_hash"])
                    counts["finished"] += 1
                    report("finished", result)
            except OutputError as exc:
                raise OutputError(f"{exc}; stopped: {_safe(store, spec, counts)}") from None
            wanted -= {item.digest for c, item in planned if c is config}
    return counts


def _safe(store, spec, counts) -> str:
    return (
        f"{counts['finished']} run(s) finished by this sweep are in {store.path} and {spec.out}; "
        "free space or fix the permissions, then run the same command again to resume"
    )


def _stored(store, spec, counts, write, result: dict | None = None) -> None:
    """A store write that fails (disk full, read-only) stops the sweep. The run's JSON, already
    written, is removed, so the folder holds exactly what the store holds and a rerun redoes it."""
    import sqlite3

    try:
        write()
    except (sqlite3.Error, OSError) as exc:
        dropped = ""
        if result is not None and result.get("path"):
            Path(result["path"]).unlink(missing_ok=True)
            dropped = f"; run {result['run_id']} was not kept"
        raise OutputError(
            f"cannot write to the store {store.path}: {exc}{dropped}; {_safe(store, spec, counts)}"
        ) from None
