"""Sweeps on a Ray cluster: every run of the matrix is one Ray task with the spec's resource
request; results stream back to the driver and land in its SQLite store as each finishes.

Ray schedules, places and survives node loss; streambench only plans and records. A run that
fails (an exception, an out-of-memory kill, a node that died) is recorded with Ray's error and
tried again up to the spec's `retries`, except for bad arguments, which no retry mends. Resume
works as for local sweeps: the driver skips runs the store holds, by config hash.

Each worker keeps the last model it loaded, so the runs of one model that land on the same worker
load it once. Every node needs streambench installed (the same version as the driver).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable

from streambench.errors import ConfigError, MissingDependencyError, StreambenchError, UnknownNameError

INSTALL_HINT = "Ray is not installed: pip install 'streambench[ray]' (or pip install 'ray[default]>=2.40')"
_LOADED: dict = {}  # per worker process: (model, device, dtype) -> LoadedModel


GROUPS = {"policy": "streambench.policies", "task": "streambench.tasks"}


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    return ray


def execute_run(config) -> dict:
    """Runs on a Ray worker: one run (a RunConfig with one policy); returns its result."""
    from streambench.models import loading as models
    from streambench.runs import runner

    key = (config.model, config.device, config.dtype, config.device_map)
    if key not in _LOADED:
        _LOADED.clear()  # one model per worker: free the last one before loading the next
        _LOADED[key] = models.load(config.model, config.device, config.dtype, device_map=config.device_map)
    with tempfile.TemporaryDirectory() as tmp:
        (result,) = list(runner.run(dataclasses.replace(config, out=tmp), lm=_LOADED[key]))
    result.pop("path", None)
    try:
        import ray

        result["environment"]["ray_node"] = ray.get_runtime_context().get_node_id()
    except Exception:  # not under Ray (called directly)
        pass
    return result


def describe(exc: BaseException) -> tuple[str, bool]:
    """(one-line message, worth retrying) for what ray.get raised."""
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the worker's exception
    if isinstance(cause, StreambenchError):
        message = str(cause)
    else:
        text = str(cause).strip().splitlines()
        message = f"{type(cause).__name__}: {text[-1] if text else ''}".strip().rstrip(":")
    return message, not isinstance(cause, (ConfigError, UnknownNameError))  # no retry mends these


def run_sweep_ray(
    spec,
    store,
    force: bool = False,
    address: str | None = None,
    report: Callable[[str, dict], None] = lambda event, info: None,
    init_kwargs: dict | None = None,
) -> dict[str, int]:
    """Run what the store does not hold yet as Ray tasks; returns counts of finished, failed and
    skipped runs. Connects to `address` (auto, ray://host:10001) or, when Ray is not initialised
    in this process and no address is given, starts a local Ray instance."""
    from streambench.results.schema import write_json_atomic
    from streambench.runs.sweep import _stored, pending
    from streambench.sanitize import check_writable, inside

    ray = import_ray()
    resources = dict(spec.resources or {})
    resources.setdefault("num_cpus", 1)
    configs = spec.runs()
    if spec.device == "auto":  # resolved for the workers, not for this (perhaps GPU-less) driver
        device = "cuda" if resources.get("num_gpus") else "cpu"
        configs = [dataclasses.replace(c, device=device) for c in configs]
    counts = {"finished": 0, "failed": 0, "skipped": 0, "elsewhere": 0}
    todo = [
        t
        for _, _, _, model_todo in pending(spec, store, force, counts, report, configs, check_device=False)
        for t in model_todo
    ]
    if not todo:
        return counts
    for _config, item in todo:
        for part in ("policy", "task"):
            if item.config[part].get("origin", {}).get("kind") == "file":
                raise ConfigError(
                    f"{part} {item.config[part]['name']} is a file plugin, which Ray workers cannot import: install it "
                    f"as a package with a {GROUPS[part]} entry point, or use --engine local"
                )
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=False, **(init_kwargs or {}))
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot start or join a Ray cluster at {address or 'this machine'}: {first}") from None
    task = ray.remote(execute_run)
    waiting: dict = {}  # ObjectRef -> (single-policy config, planned item, attempt)

    def submit(config, item, attempt: int) -> None:
        ref = task.options(max_retries=0, name=item.run_id, **resources).remote(config)
        waiting[ref] = (config, item, attempt)

    try:
        for config, item in todo:
            if not store.claim(item.digest, force=force):  # another sweep on this store is computing it
                counts["elsewhere"] += 1
                report("elsewhere", {"run_id": item.run_id})
                continue
            submit(dataclasses.replace(config, policies=[item.spec]), item, 1)
        while waiting:
            (ref,), _ = ray.wait(list(waiting), num_returns=1)
            config, item, attempt = waiting.pop(ref)
            try:
                result = ray.get(ref)
                if result["config_hash"] != item.digest:
                    raise RuntimeError(
                        f"the worker planned config {result['config_hash'][:10]}, the driver {item.digest[:10]}"
                        " (different streambench versions on driver and worker?)"
                    )
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                message, retry = describe(exc)
                store.add_failure(
                    item.config,
                    item.digest,
                    item.run_id,
                    item.spec.display,
                    f"attempt {attempt} of {spec.retries + 1}: {message}",
                )
                if retry and attempt <= spec.retries:
                    report("retry", {"run_id": item.run_id, "error": message, "attempt": attempt})
                    submit(config, item, attempt + 1)
                else:
                    counts["failed"] += 1
                    report("failed", {"run_id": item.run_id, "error": message})
                continue
            path = inside(check_writable(config.out), f"{item.run_id}.json")
            write_json_atomic(path, result)
            result["path"] = str(path)
            _stored(store, spec, counts, lambda r=result: store.add(r), result)
            counts["finished"] += 1
            report("finished", result)
    finally:
        for ref in waiting:  # interrupted: stop what is still running; finished runs are stored
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()
    return counts
