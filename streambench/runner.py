"""`streambench.run(config)`: validate everything, load the model once, run each policy, write one
JSON result per finished run as soon as it finishes (so an interrupted run loses nothing done)."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable, Iterator

from streambench.config import RunConfig, build_policy, build_task
from streambench.results import ENGINE_DIRECTIONS, SCHEMA, config_hash, environment, now_iso, write_json_atomic

ProgressFactory = Callable[[str, int], "Progress"]


class Progress:
    """Minimal progress protocol: `total(n)` once the task knows its size, call with the units
    done (tokens, items or rounds), `close()` at the end."""

    def total(self, n: int, unit: str = "tok") -> None: ...

    def __call__(self, n: int) -> None: ...

    def close(self) -> None: ...


def _silent(_desc: str, _total: int) -> Progress:
    return Progress()


def plan(config: RunConfig):
    """Build and validate the task and every policy before anything heavy is loaded."""
    task = build_task(config.task, config.task_args)
    budget = config.budget if config.budget is not None else task.default_budget
    policies = [(spec, build_policy(spec, budget)) for spec in config.policies]
    return task, policies


def run(config: RunConfig, progress: ProgressFactory = _silent, lm=None) -> Iterator[dict]:
    """Yield one result dict per policy, each already written to `config.out`."""
    task, policies = plan(config)
    import numpy as np
    import torch

    from streambench import models
    from streambench.metrics import Meter
    from streambench.session import StreamSession

    if lm is None:
        lm = models.load(config.model, config.device, config.dtype)
    env = environment(next(lm.model.parameters()).device)
    out_dir = Path(config.out)
    for spec, policy in policies:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        run_config = {
            "model": config.model,
            "device": str(next(lm.model.parameters()).device),
            "dtype": lm.info.dtype,
            "seed": config.seed,
            "task": {"name": task.name, "version": task.version, "args": task.args()},
            "policy": {"name": policy.name, "args": policy.args()},
        }
        digest = config_hash(run_config)
        budget = policy.budget if policy.budget is not None else "inf"
        run_id = f"{task.name}-{spec.display}-b{budget}-{digest[:10]}"
        started, t0 = now_iso(), time.perf_counter()
        session = StreamSession(lm, policy)
        meter = Meter(session.device)
        bar = progress(spec.display, 0)
        try:
            outcome = task.run(session, lm.tokenizer, meter, bar)
        finally:
            bar.close()
        engine_metrics, engine_curves = meter.finish(session.allocated_kv_bytes)
        metrics = {**outcome.metrics, **engine_metrics, **policy.stats()}
        directions = {k: v for k, v in {**ENGINE_DIRECTIONS, **task.higher_is_better}.items() if k in metrics}
        result = {
            "schema": SCHEMA,
            "run_id": run_id,
            "label": spec.display,
            "config": run_config,
            "config_hash": digest,
            "model": lm.info.as_dict(),
            "metrics": metrics,
            "higher_is_better": directions,
            "curves": {**outcome.curves, **engine_curves},
            "records": outcome.records,
            "info": outcome.info,
            "environment": env,
            "timing": {
                "started": started,
                "finished": now_iso(),
                "wall_s": round(time.perf_counter() - t0, 3),
                "model_load_s": lm.info.load_seconds,
            },
        }
        path = out_dir / f"{run_id}.json"
        write_json_atomic(path, result)
        result["path"] = str(path)
        yield result

