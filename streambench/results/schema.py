"""The result schema (one JSON file per run), atomic writing, and reading with validation.

Schema `streambench.result/1`:

    schema          "streambench.result/1"
    run_id          "<task>-<policy>-b<budget>-<config hash[:10]>"
    config          {model, device, dtype, seed, task: {name, version, args}, policy: {name, args}}
    config_hash     sha256 of the canonical JSON of `config` (what a resumed sweep compares)
    model           ModelInfo: name, source, model_type, layers, heads, kv_heads, head_dim, ...
    metrics         {name: number}: task metrics plus tokens_per_s (throughput), decode_tokens_per_s, latency, memory
    higher_is_better {metric name: bool} for every metric a gate may compare
    curves          {name: {index: [...], value: [...]}}: per-position NLL, KV tokens over the stream
    records         per-item records (dialogue tasks); [] for perplexity
    info            what the task actually ran (text source, token counts, token_exact, ...)
    environment     python, platform, package versions, torch threads, device name, git commit
    timing          started/finished (UTC ISO 8601), wall_s, model_load_s
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from streambench.errors import ResultsError

SCHEMA = "streambench.result/1"
REQUIRED = ("schema", "run_id", "config", "config_hash", "metrics", "higher_is_better")

# Directions of the engine-level metrics every run reports (tasks declare their own).
ENGINE_DIRECTIONS = {
    "tokens_per_s": True,  # evaluation throughput (a chunked stream: far above decode speed)
    "decode_tokens_per_s": True,  # per-token decode speed (perplexity: the run itself, or a probe)
    "latency_p50_ms": False,
    "latency_p95_ms": False,
    "rss_peak_mib": False,
    "cuda_peak_mib": False,
    "nvml_used_peak_mib": False,
    "kv_mib_peak": False,
    "kv_physical_mib_peak": False,  # lanes keeping unequal counts: every layer at its longest lane
    "kv_tokens_peak": False,
    "kv_allocated_mib": False,
    "kv_full_mib_peak": False,  # hybrid models: the policy-governed full-attention layers
    "kv_sliding_mib_peak": False,  # ... and the sliding-window layers (the model's own window)
    "bank_mib": False,  # longmem's memory bank (host memory by default)
}


def peak_memory_mib(metrics: dict[str, Any]) -> float:
    """The memory figure a table shows: the CUDA allocator's peak on GPU, else process RSS."""
    return float(metrics.get("cuda_peak_mib", metrics.get("rss_peak_mib", float("nan"))))


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment(device) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions: dict[str, str | None] = {}
    for pkg in ("streambench", "torch", "transformers", "accelerate", "numpy", "datasets", "lm-eval"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    return env


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """A result or baseline, written atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(payload, indent=1, allow_nan=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: never a half-written file.
    The file gets the mode an ordinary open() would (mkstemp's 0600 would hide results from the
    team that reads the store beside them). A full or read-only disk is an OutputError."""
    from streambench.errors import OutputError
    from streambench.sanitize import describe_os_error, file_mode

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), file_mode())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # KeyboardInterrupt included: remove the partial temp file
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {describe_os_error(exc)}") from None
        raise


def read_result(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"results file not found: {path}") from None
    except IsADirectoryError:
        raise ResultsError(f"{path} is a folder, not a results file") from None
    except OSError as exc:
        raise ResultsError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ResultsError(f"corrupt results file {path}: {str(exc)[:200]}") from None
    return validate_result(data, str(path))


def validate_result(data: Any, where: str) -> dict[str, Any]:
    """Check the parts of a result that the store, reports and gates index into, so that a hand-
    edited, truncated or foreign file is one line naming what is wrong, never a KeyError later.
    A result whose config_hash is not the hash of its config is refused: the hash is the run's
    identity (resume, gate), and a mismatch means the file was edited or made by something else."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ResultsError(f"{where} is not a streambench result (schema {found!r}, expected {SCHEMA!r})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ResultsError(f"{where} lacks {', '.join(missing)}")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ResultsError(f"{where}: {what}")

    config = data["config"]
    need(isinstance(config, dict), "config is not a mapping")
    need(isinstance(config.get("model"), str), "config.model is not a string")
    for part in ("task", "policy"):
        need(
            isinstance(config.get(part), dict) and isinstance(config[part].get("name"), str),
            f"config.{part} lacks a name",
        )
    need(isinstance(config["policy"].get("args", {}), dict), "config.policy.args is not a mapping")
    need(isinstance(data["run_id"], str) and bool(data["run_id"]), "run_id is not a string")
    need(data.get("label") is None or isinstance(data["label"], str), "label is not a string")
    need(isinstance(data["metrics"], dict), "metrics is not a mapping")
    need(isinstance(data["higher_is_better"], dict), "higher_is_better is not a mapping")
    need(all(isinstance(k, str) for k in data["metrics"]), "metric names are not strings")
    need(
        all(isinstance(v, bool) for v in data["higher_is_better"].values()),
        "higher_is_better values are not true/false",
    )
    timing = data.get("timing", {})
    need(isinstance(timing, dict), "timing is not a mapping")
    budget = config["policy"].get("args", {}).get("budget")
    need(budget is None or (isinstance(budget, int) and not isinstance(budget, bool)), "the budget is not an integer")
    need(
        data["config_hash"] == config_hash(config),
        f"config_hash {str(data['config_hash'])[:12]} is not the hash of its config (edited or foreign file)",
    )
    return data
