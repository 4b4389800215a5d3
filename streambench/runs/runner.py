"""`streambench.run(config)`: validate everything, load the model once, run each policy, write one
JSON result per finished run as soon as it finishes (so an interrupted run loses nothing done)."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from streambench.engine.cache.quant import KVQuant, parse_bits
from streambench.errors import ConfigError
from streambench.policies import POLICIES
from streambench.policies.build import PolicySpec, build_policy
from streambench.registry import BUILTIN, plugin_fault
from streambench.results.schema import ENGINE_DIRECTIONS, SCHEMA, config_hash, environment, now_iso, write_json_atomic
from streambench.runs.config import RunConfig, resolve_budget
from streambench.sanitize import check_label, inside, slug
from streambench.tasks import TASKS
from streambench.tasks.base import NoProgress, Progress, Task
from streambench.tasks.build import build_task
from streambench.values import check_seed

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

ProgressFactory = Callable[[str, int], Progress]


def silent(_desc: str, _total: int) -> Progress:
    """A ProgressFactory that shows nothing."""
    return NoProgress()


@dataclass
class PlannedRun:
    spec: PolicySpec
    policy: object
    config: dict  # what the config hash covers
    digest: str
    run_id: str
    decode: str = "eager"  # "graph": one-token steps replayed as CUDA graphs
    budget_ratio: dict | None = None  # a budget given as a share of the context, and what it resolved to
    fits_checked: bool = False  # the size guard passed at planning (the model's shape was readable)
    quant: KVQuant | None = None  # a quantized cache (None: the model's dtype)
    device_steps: bool | None = None  # evictions on the device (None: with CUDA; StreamSession)


class Plan(NamedTuple):
    """What `plan` decided, passed down as is: the task, one PlannedRun per policy, and which
    runs share one batch (indices into runs; runs/grouping.py) and why the others run alone."""

    task: Task
    runs: list[PlannedRun]
    groups: list[list[int]] = []
    alone: dict[int, str] = {}

    def grouping(self) -> list[str]:
        """The grouping in lines for the user (nothing when no run is grouped)."""
        from streambench.runs.grouping import describe

        return describe(self.runs, self.groups, self.alone) if self.groups else []


def plan(config: RunConfig, check_device: bool = True) -> Plan:
    """Build and validate the task and every policy before anything heavy is loaded; each run's
    config and hash are known here, so a sweep can skip finished runs without loading a model.
    Budget, feeding-relevant sizes, decode mode and the fit on the device are decided here, once.
    `check_device=False` plans for another machine (a Ray worker): the device is taken as named."""
    import torch

    from streambench.engine.observe import EAGER_ONLY  # observations in Python decode eagerly (session.py)
    from streambench.models.loading import check_device_name, resolve_device, resolve_dtype

    check_run_config(config)
    task = build_task(config.task, config.task_args, config.task_defaults)
    budget, ratio = resolve_budget(config.budget, task)
    if budget is None:
        budget = task.default_budget
    device = (
        resolve_device(config.device)
        if check_device
        else torch.device(config.device if config.device != "auto" else "cpu")
    )
    dtype = str(resolve_dtype(config.dtype, device)).replace("torch.", "")
    if config.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"--cuda-graphs needs a CUDA device (this run is on {device})")
    graphs = config.cuda_graphs is not False and device.type == "cuda"
    batch = config.batch_size
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch size must be an integer >= 1, got {batch!r}")
    if batch > 1 and not task.batchable:
        raise ConfigError(
            f"task {task.name} runs one stream at a time; --batch-size applies to perplexity, grocery, rps and dailydialog"
        )
    planned = []
    from streambench.models.loading import peek_shape
    from streambench.models.size_guard import check_fits

    shape = peek_shape(config.model)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    quants = [
        KVQuant(bits, method=config.kv_method, group=config.kv_group, residual=config.kv_residual)
        for bits in parse_bits(config.kv_bits, "kv_bits")
    ]
    for quant in quants:
        if shape is not None:
            quant.check(shape.head_dim)
    for spec, quant in [(spec, quant) for spec in config.policies for quant in quants]:
        check_label(spec.label, f"label of {spec.name}")
        policy = build_policy(spec, budget, explicit=config.budget is not None)
        if quant.quantized and policy.recompute:
            raise ConfigError(
                f"{spec.display} re-encodes its window every step and holds no cache to quantize (--kv-bits)"
            )
        if quant.quantized and quant.per_channel and policy.retrieves:
            raise ConfigError(
                f"{spec.display} splices tokens back from its bank, which KIVI's key blocks cannot take in: "
                "use --kv-method token"
            )
        if policy.prefill_only and not task.compresses_once:
            raise ConfigError(
                f"{spec.display} scores a whole prefill at once: it runs only where a context is compressed "
                "once (-t protocol=compress-once on needle or kvpress-eval), not in a stream"
            )
        if batch > 1 and policy.retrieves and not task.lanes:  # (a task's conversations: it plays them alone)
            raise ConfigError(f"{policy.name} keeps one memory bank per stream: run it with --batch-size 1")
        bank_device = policy.args().get("bank_device")
        if bank_device is not None:
            check_device_name(bank_device, "bank_device")
            if check_device:
                resolve_device(bank_device)
        fits = shape is not None and check_device
        if fits:  # refuse what cannot fit before the model loads
            check_fits(spec.display, policy, shape, itemsize, batch, task.stream_tokens(), device)
        run_config = {
            "model": config.model,
            "device": str(device),
            "dtype": dtype,
            "seed": config.seed,
            "task": {"name": task.name, "version": task.version, "args": task.args()},
            "policy": {"name": policy.name, "args": policy.args()},
        }
        for part, registry, name in (("task", TASKS, task.name), ("policy", POLICIES, policy.name)):
            origin = registry.origin(name)
            if origin is not BUILTIN:  # a plugin: what ran (its sha256, or distribution and version);
                # the path goes to the result's provenance, so a clone elsewhere keeps the hash
                run_config[part]["origin"] = {k: v for k, v in origin.items() if k != "path"}
        if batch > 1:  # speed depends on it, quality does not; batch 1 keeps the hashes it always had
            run_config["batch_size"] = batch
        if config.device_map is not None:
            run_config["device_map"] = config.device_map
        if quant.quantized:  # (unquantized runs keep the hashes they always had)
            run_config["kv_quant"] = quant.record()
        graphable = not policy.recompute and not policy.retrieves and not policy.observes & EAGER_ONLY
        graphable = graphable and not quant.quantized  # (dequantizes as each layer reads it: eager)
        decode = "graph" if graphs and graphable else "eager"
        if decode == "graph":  # speed only; recorded so GPU runs with and without graphs stay apart
            run_config["decode"] = decode
        if spec.label is not None and spec.label != policy.name:
            # A label names a run: two labels on the same settings are two runs (two rows, two
            # baseline entries), and relabelling reruns. Unlabelled runs keep the hashes they had.
            run_config["label"] = spec.label
        digest = config_hash(run_config)
        shown = policy.budget if policy.budget is not None else "inf"
        tag = f"-{quant.tag}" if quant.quantized else ""
        run_id = f"{slug(task.name, 24)}-{slug(spec.display)}{tag}-b{shown}-{digest[:10]}"
        planned.append(
            PlannedRun(
                spec,
                policy,
                run_config,
                digest,
                run_id,
                decode,
                ratio if ratio and "budget" not in spec.args and policy.budget == ratio["keys"] else None,
                fits,
                quant if quant.quantized else None,
                config.device_steps,
            )
        )
    from streambench.runs.grouping import group_runs

    groups, alone = group_runs(task, planned, config)
    return Plan(task, planned, groups, alone)


def check_run_config(config: RunConfig) -> None:
    """Types and ranges of the run-level settings (flags, sweep specs), before anything loads."""
    if not isinstance(config.model, str) or not config.model.strip():
        raise ConfigError(f"model must be a name, folder or file, got {config.model!r}")
    for key in ("device", "dtype", "task", "out"):
        if not isinstance(getattr(config, key), str):
            raise ConfigError(f"{key} must be a string, got {getattr(config, key)!r}")
    check_seed(config.seed)
    if config.device_map is not None and config.device_map not in DEVICE_MAPS:
        raise ConfigError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {config.device_map!r}")
    for key in ("cuda_graphs", "device_steps"):
        if getattr(config, key) not in (None, True, False):
            raise ConfigError(f"{key} must be true or false, got {getattr(config, key)!r}")
    if not config.policies:
        raise ConfigError("no policy given")


def run(
    config: RunConfig,
    progress: ProgressFactory = silent,
    lm=None,
    skip: frozenset[str] = frozenset(),
    on_error: Callable | None = None,
    claim: Callable[[PlannedRun], bool] | None = None,
    planned: Plan | None = None,
) -> Iterator[dict]:
    """Yield one result dict per policy, each already written to `config.out`. Runs whose config
    hash is in `skip` are left out (the model is not even loaded if nothing is left); with
    `on_error`, a failing run is reported to it (planned run, exception) and the others go on;
    with `claim`, a run is computed only if claim(run) says it is ours (concurrent sweeps);
    `planned`: this config's plan when the caller made it already (it is not made twice)."""
    made = planned if planned is not None else plan(config)
    task, runs = made.task, made.runs
    todo = [p for p in runs if p.digest not in skip]
    if not todo:
        return
    group_of = {id(runs[i]): members for members in made.groups for i in members}  # run -> its group
    from streambench.errors import OutputError
    from streambench.models import loading as models
    from streambench.models.size_guard import Shape, check_fits
    from streambench.sanitize import check_writable

    out_dir = check_writable(config.out)  # a read-only or full disk fails now, not after the run
    if lm is None:
        lm = models.load(config.model, config.device, config.dtype, device_map=config.device_map)
    param = next(lm.model.parameters())
    env = environment(param.device)
    shape = Shape(lm.info.num_layers, lm.info.kv_heads, lm.info.head_dim)
    done: set[int] = set()  # runs already computed in a group
    for item in todo:
        if id(item) in done:
            continue
        members = [runs[i] for i in group_of.get(id(item), [])]
        members = [m for m in members if m.digest not in skip and id(m) not in done]
        alone = [item]
        if len(members) > 1:
            members = [m for m in members if claim is None or claim(m)]
            done.update(id(m) for m in members)
            alone = members
            if any(m.policy.batch_sensitive is not None for m in members) and not _exact(lm.model):
                # (planned exact, but the model's own weights failed the proof: those run alone)
                members = [m for m in members if m.policy.batch_sensitive is None]
            if len(members) > 1:
                results = _try_group(members, task, lm, env, out_dir, config, progress, shape, param)
                if results is not None:
                    yield from results
                    grouped = {id(m) for m in members}
                    alone = [m for m in alone if id(m) not in grouped]
        elif claim is not None and not claim(item):
            continue
        for item in alone:  # (a group that failed: each run alone, its failure its own)
            try:
                if not item.fits_checked:  # (the plan could not read the shape before loading)
                    check_fits(
                        item.spec.display,
                        item.policy,
                        shape,
                        param.element_size(),
                        config.batch_size,
                        task.stream_tokens(),
                        param.device,
                    )
                yield _run_one(item, task, lm, env, out_dir, config.seed, progress, config.batch_size)
            except (KeyboardInterrupt, GeneratorExit, OutputError):
                raise  # an output that cannot be written stops the sweep: every later run would fail too
            except (Exception, SystemExit) as exc:  # one failing run (out of memory, a bad turn) does not stop a sweep
                fault = plugin_fault(exc)  # a plugin's defect (its SystemExit too) is a plugin error naming it
                if fault is None and isinstance(exc, SystemExit):
                    raise
                if on_error is None:
                    if fault is None:
                        raise
                    raise fault from exc
                on_error(item, fault or exc)


def _exact(model) -> bool:
    """Whether a group's steps give each stream its bits alone (models/few_rows.py)."""
    from streambench.models.few_rows import exact_steps, install

    return install(model) and exact_steps(model)


def _try_group(members, task, lm, env, out_dir, config, progress, shape, param) -> list[dict] | None:
    """A group's results, or None where any of its runs fails (a plugin's defect, memory): the
    runner then runs each alone, so one run's failure is not its neighbours'."""
    from streambench.errors import OutputError
    from streambench.models.size_guard import check_fits

    try:
        for item in members:
            check_fits(
                item.spec.display,
                item.policy,
                shape,
                param.element_size(),
                len(members),
                task.stream_tokens(),
                param.device,
            )
        return _run_group(members, task, lm, env, out_dir, config.seed, progress)
    except (KeyboardInterrupt, GeneratorExit, OutputError):
        raise
    except (Exception, SystemExit):
        return None


def _run_group(
    members: list[PlannedRun], task, lm, env: dict, out_dir: Path, seed: int, progress: ProgressFactory
) -> list[dict]:
    """The group's runs as one batch (runs/grouping.py), one result each, written as each is alone."""
    import numpy as np
    import torch

    from streambench.engine.meter import GroupMeter
    from streambench.engine.session import StreamSession

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    started, t0 = now_iso(), time.perf_counter()
    policies = [item.policy for item in members]
    with StreamSession(
        lm, policies[0], max_tokens=task.stream_tokens(), group=policies, device_steps=members[0].device_steps
    ) as session:
        meter = GroupMeter(session.device, len(members))
        meter.start(session)
        bar = progress(" + ".join(item.spec.display for item in members), 0)
        try:
            outcomes = task.run_group(session, lm.tokenizer, meter, bar)
        finally:
            bar.close()
        allocated = session.allocated_kv_bytes // len(members)
        engine = [meter.finish(b, allocated) for b in range(len(members))]
        layers = session.layer_accounting()
        on_device = session.device_evictions > 0
    wall = time.perf_counter() - t0
    together = [item.run_id for item in members]
    results = []
    for b, (item, outcome) in enumerate(zip(members, outcomes)):
        outcome.info["grouped"] = {
            "streams": len(members),
            "with": [run_id for run_id in together if run_id != item.run_id],
            "why": "the same stream under several policies in one batch: tokens/s is the rate this stream advanced at",
        }
        if on_device:  # (evictions chosen and applied on the device)
            outcome.info["device_steps"] = True
        engine_metrics, engine_curves = engine[b]
        results.append(
            _write(item, task, lm, env, out_dir, outcome, engine_metrics, engine_curves, layers, started, wall)
        )
    return results


def _run_one(
    item: PlannedRun, task, lm, env: dict, out_dir: Path, seed: int, progress: ProgressFactory, batch_size: int = 1
) -> dict:
    import numpy as np
    import torch

    from streambench.engine.meter import Meter
    from streambench.engine.session import StreamSession

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    started, t0 = now_iso(), time.perf_counter()
    group, batched = None, None
    if batch_size > 1 and task.lanes:
        # the task's conversations as the ragged streams of one batch (engine/lanes.py), or alone
        from streambench.engine.ragged import ragged_refusal

        known = task.conversations()
        batch_size = min(batch_size, known) if known else batch_size
        why = task.lanes_refusal() or ragged_refusal(item.policy, item.quant, lm.model)
        if batch_size == 1:
            why = why or "one conversation"
        if why is None:
            group = [item.policy] + [copy.deepcopy(item.policy) for _ in range(batch_size - 1)]
            batched = {"streams": batch_size, "why": "conversations of the task as the ragged streams of one batch"}
        else:
            batch_size, batched = 1, {"streams": 1, "why": why}
    with StreamSession(
        lm,
        item.policy,
        batch_size=batch_size,
        decode=item.decode if group is None else "eager",
        max_tokens=task.stream_tokens(),
        quant=item.quant,
        group=group,
        device_steps=item.device_steps,
        bitwise=False,  # (a dialogue batch's turns are float-close: its short steps take the faster layout)
    ) as session:
        meter = Meter(session.device)
        meter.start(session)
        bar = progress(item.spec.display, 0)
        try:
            outcome = task.run(session, lm.tokenizer, meter, bar)
        finally:
            bar.close()
        engine_metrics, engine_curves = meter.finish(session.allocated_kv_bytes)
        layers = session.layer_accounting()
        if session.device_evictions:  # (a CUDA run of a device-side policy: evictions chosen on the GPU)
            outcome.info["device_steps"] = True
    if batched is not None:
        outcome.info["batched"] = batched
    return _write(
        item, task, lm, env, out_dir, outcome, engine_metrics, engine_curves, layers, started, time.perf_counter() - t0
    )


def _write(item, task, lm, env, out_dir, outcome, engine_metrics, engine_curves, layers, started, wall) -> dict:
    """The run's result, written to its JSON file."""
    if layers is not None:  # hybrid: the governed layers' KV and the sliding windows', apart
        from streambench.engine.meter import MIB

        full = layers["full_attention"]
        engine_metrics["kv_full_mib_peak"] = engine_metrics["kv_tokens_peak"] * full["bytes_per_token"] / MIB
        # both kinds only grow within a stream (up to the budget, up to the window): the total's
        # peak is theirs together, and the sliding layers' share is the rest
        engine_metrics["kv_sliding_mib_peak"] = engine_metrics["kv_mib_peak"] - engine_metrics["kv_full_mib_peak"]
    metrics = {**outcome.metrics, **engine_metrics, **item.policy.stats()}
    declared = {**ENGINE_DIRECTIONS, **task.higher_is_better, **outcome.higher_is_better}
    directions = {k: v for k, v in declared.items() if k in metrics}
    result = {
        "schema": SCHEMA,
        "run_id": item.run_id,
        "label": item.spec.display + (f" {item.quant.tag}" if item.quant is not None else ""),
        "config": item.config,
        "config_hash": item.digest,
        "model": lm.info.as_dict(),
        "metrics": metrics,
        "higher_is_better": directions,
        "curves": {**outcome.curves, **engine_curves},
        "records": outcome.records,
        "info": outcome.info,
        **({"kv_layers": layers} if layers is not None else {}),
        **({"budget_ratio": item.budget_ratio} if item.budget_ratio else {}),
        "environment": env,
        "provenance": {
            part: POLICIES.origin(item.policy.name) if part == "policy" else TASKS.origin(task.name)
            for part in ("task", "policy")
        },
        "timing": {
            "started": started,
            "finished": now_iso(),
            "wall_s": round(wall, 3),
            "model_load_s": lm.info.load_seconds,
        },
    }
    path = inside(out_dir, f"{item.run_id}.json")
    write_json_atomic(path, result)
    result["path"] = str(path)
    return result
