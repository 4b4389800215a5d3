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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from streambench.config import PRESET_META, PolicySpec, RunConfig, load_preset, resolve_policy
from streambench.errors import ConfigError, StreambenchError

SPEC_KEYS = {"models", "model", "budgets", "budget", "policies", "tasks", "task", "device", "dtype", "seed",
             "store", "out", "version", "description", "include"}


@dataclass
class SweepSpec:
    models: list[str]
    tasks: list[tuple[str, dict]]
    budgets: list[int | None]
    policies: list[PolicySpec]
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    store: str = "results/streambench.sqlite"
    out: str = "results"

    def runs(self) -> list[RunConfig]:
        """One RunConfig per (model, task, budget), each with every policy."""
        return [
            RunConfig(model=m, device=self.device, dtype=self.dtype, seed=self.seed, budget=b,
                      policies=[PolicySpec(p.name, dict(p.args), p.label) for p in self.policies],
                      task=t, task_args=dict(args), out=self.out)
            for m in self.models for t, args in self.tasks for b in self.budgets
        ]


def load_spec(path: str | Path) -> SweepSpec:
    data = load_preset(Path(path))
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"sweep spec {Path(path).name}: unknown key(s) {', '.join(unknown)}")
    models = _as_list(data.get("models", data.get("model", "smollm2-135m")), "models")
    budgets = _as_list(data.get("budgets", data.get("budget")), "budgets")
    for b in budgets:
        if b is not None and (not isinstance(b, int) or b < 1):
            raise ConfigError(f"sweep spec: budgets must be positive integers, got {b!r}")
    policies = [_policy(p) for p in _as_list(data.get("policies"), "policies")]
    tasks = [_task(t) for t in _as_list(data.get("tasks", data.get("task", "perplexity")), "tasks")]
    if not policies:
        raise ConfigError("sweep spec names no policies")
    spec = SweepSpec(models, tasks, budgets, policies, str(data.get("device", "auto")), str(data.get("dtype", "auto")),
                     int(data.get("seed", 0)), str(data.get("store", "results/streambench.sqlite")),
                     str(data.get("out", "results")))
    for config in spec.runs():  # validate every policy, task and size now, before any model loads
        from streambench.runner import plan

        plan(config)
    return spec


def _as_list(value: Any, key: str) -> list:
    if value is None:
        return [None]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _policy(item: Any) -> PolicySpec:
    if isinstance(item, str):
        return resolve_policy(item, {})
    if isinstance(item, dict) and "policy" in item:
        spec = resolve_policy(str(item["policy"]), {})
        spec.args.update({k: v for k, v in item.items() if k not in PRESET_META and k != "label"})
        spec.label = item.get("label", spec.label)
        return spec
    raise ConfigError(f"sweep spec: a policy is a name or a mapping with 'policy:', got {item!r}")


def _task(item: Any) -> tuple[str, dict]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and "task" in item:
        return str(item["task"]), {k: v for k, v in item.items() if k not in PRESET_META}
    raise ConfigError(f"sweep spec: a task is a name or a mapping with 'task:', got {item!r}")


def run_sweep(spec: SweepSpec, store, force: bool = False, progress=None,
              report: Callable[[str, dict], None] = lambda event, info: None) -> dict[str, int]:
    """Run what the store does not hold yet; returns counts of finished, failed and skipped runs."""
    from streambench import models, runner

    counts = {"finished": 0, "failed": 0, "skipped": 0}
    done = set() if force else store.finished()
    seen: set[str] = set()
    for model in spec.models:
        configs = [c for c in spec.runs() if c.model == model]
        planned = [(c, p) for c in configs for p in runner.plan(c)[1]]
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
        if not todo:
            continue
        try:
            lm = models.load(model, spec.device, spec.dtype)
        except StreambenchError as exc:
            for _, item in todo:
                store.add_failure(item.config, item.digest, item.run_id, item.spec.display, str(exc))
                counts["failed"] += 1
                report("failed", {"run_id": item.run_id, "error": str(exc)})
            continue

        def failed(item, exc, _counts=counts):
            message = str(exc) if isinstance(exc, StreambenchError) else "".join(
                traceback.format_exception_only(type(exc), exc)).strip()
            store.add_failure(item.config, item.digest, item.run_id, item.spec.display, message)
            _counts["failed"] += 1
            report("failed", {"run_id": item.run_id, "error": message})

        wanted = {item.digest for _, item in todo}
        for config in configs:
            skip = frozenset(item.digest for c, item in planned if c is config and item.digest not in wanted)
            for result in runner.run(config, progress or runner._silent, lm=lm, skip=skip, on_error=failed):
                store.add(result)
                wanted.discard(result["config_hash"])
                counts["finished"] += 1
                report("finished", result)
            wanted -= {item.digest for c, item in planned if c is config}
    return counts
