"""Regression gating: compare results with a baseline under per-metric tolerances and directions.

Baseline file (JSON, schema `streambench.baseline/1`):

    {"schema": "streambench.baseline/1",
     "metrics": ["ppl", "ppl_last_half"],            # gated per run (quality: deterministic)
     "tolerances": {"ppl": {"rel": 0.002}},          # per metric; "rel" or "abs"
     "default_tolerance": {"rel": 0.002},
     "ratios": [{"name": "sinks_vs_recompute_speed", "metric": "tokens_per_s",
                 "numerator": "perplexity/smollm2-135m/streamingllm/b64",
                 "denominator": "perplexity/smollm2-135m/recompute-window/b64", "min": 1.5}],
     "runs": {"perplexity/smollm2-135m/streamingllm/b64":
              {"config_hash": "...", "metrics": {"ppl": 18.33}, "higher_is_better": {"ppl": false}}}}

Speed depends on the machine, so it is gated only as ratios measured in the same run. Exit codes
(CLI): 0 pass, 1 a regression, 2 bad input (missing run or metric, mismatched config, bad file).

The schema is checked whole before anything is compared (`validate_baseline`): a baseline with a
tolerance that is a string, a metric that is not a name, a ratio without its metric or with a
bound that is not a number is bad input (exit 2), never read as a regression (exit 1).
  metrics            list of metric names
  tolerances         {metric: {"rel": number >= 0, "abs": number >= 0}} (either or both)
  default_tolerance  {"rel": ..., "abs": ...}
  ratios             [{name, metric, numerator, denominator: strings; min and/or max: numbers}]
  runs               {run key: {metrics: {name: number}, config_hash?: string, higher_is_better?: {name: bool}}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streambench.errors import ResultsError
from streambench.run_fields import budget_id, label, model_name, task_name

SCHEMA = "streambench.baseline/1"
DEFAULT_TOLERANCE = {"rel": 0.002}


def run_key(result: dict) -> str:
    """A run's key in a baseline: task/model/label/b<budget> (b"inf" when unbounded)."""
    return f"{task_name(result)}/{model_name(result)}/{label(result)}/b{budget_id(result)}"


@dataclass
class Check:
    run: str
    metric: str
    baseline: float
    current: float
    limit: float
    passed: bool

    @property
    def delta(self) -> float:
        return (self.current - self.baseline) / abs(self.baseline) if self.baseline else math.inf


def load_baseline(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"baseline not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"malformed baseline {path}: {exc}") from None
    except OSError as exc:
        raise ResultsError(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    return validate_baseline(data, str(path))


BASELINE_KEYS = {"schema", "metrics", "tolerances", "default_tolerance", "ratios", "runs", "description"}
RATIO_KEYS = {"name", "metric", "numerator", "denominator", "min", "max"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_baseline(data: Any, path: str) -> dict[str, Any]:
    def bad(what: str) -> ResultsError:
        return ResultsError(f"malformed baseline {path}: {what}")

    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise bad(f"expected schema {SCHEMA!r}")
    unknown = sorted(set(map(str, data)) - BASELINE_KEYS)
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}")
    for key, kind in (("runs", dict), ("metrics", list), ("ratios", list), ("tolerances", dict)):
        if not isinstance(data.setdefault(key, kind()), kind):
            raise bad(f"'{key}' must be a {'mapping' if kind is dict else 'list'}")
    if not all(isinstance(m, str) and m for m in data["metrics"]):
        raise bad(f"'metrics' must list metric names (strings), got {data['metrics']!r}")

    def tolerance(value, where: str) -> None:
        if not isinstance(value, dict) or not value or set(value) - {"rel", "abs"}:
            raise bad(f"{where} must be a mapping with 'rel' and/or 'abs', got {value!r}")
        for k, v in value.items():
            if not _number(v) or v < 0:
                raise bad(f"{where}.{k} must be a number >= 0, got {v!r}")

    for metric, tol in data["tolerances"].items():
        tolerance(tol, f"tolerances.{metric}")
    if "default_tolerance" in data:
        tolerance(data["default_tolerance"], "default_tolerance")
    for i, ratio in enumerate(data["ratios"]):
        if not isinstance(ratio, dict):
            raise bad(f"ratios[{i}] must be a mapping, got {ratio!r}")
        extra = sorted(set(map(str, ratio)) - RATIO_KEYS)
        if extra:
            raise bad(f"ratios[{i}]: unknown key(s) {', '.join(extra)}")
        for key in ("name", "metric", "numerator", "denominator"):
            if not isinstance(ratio.get(key), str) or not ratio[key]:
                raise bad(f"ratios[{i}] needs '{key}' (a string), got {ratio.get(key)!r}")
        if "min" not in ratio and "max" not in ratio:
            raise bad(f"ratio {ratio['name']} needs 'min' and/or 'max'")
        for key in ("min", "max"):
            if key in ratio and not _number(ratio[key]):
                raise bad(f"ratio {ratio['name']}: '{key}' must be a number, got {ratio[key]!r}")
    for name, run in data["runs"].items():
        if not isinstance(run, dict) or not isinstance(run.get("metrics"), dict):
            raise bad(f"run {name!r} has no metrics")
        for metric, value in run["metrics"].items():
            if not _number(value):
                raise bad(f"run {name!r}: metric {metric} must be a finite number, got {value!r}")
        if not isinstance(run.get("higher_is_better", {}), dict) or not all(
            isinstance(v, bool) for v in run.get("higher_is_better", {}).values()
        ):
            raise bad(f"run {name!r}: higher_is_better must map metrics to true/false")
        if "config_hash" in run and not isinstance(run["config_hash"], str):
            raise bad(f"run {name!r}: config_hash must be a string")
    return data


def compare(baseline: dict[str, Any], results: list[dict]) -> tuple[list[Check], list[Check]]:
    """(per-run checks, ratio checks); raises ResultsError for bad input."""
    current = {}
    for r in results:
        current[run_key(r)] = r
    checks = []
    for key, base in baseline["runs"].items():
        if key not in current:
            raise ResultsError(f"no result for baseline run {key}")
        result = current[key]
        if base.get("config_hash") and base["config_hash"] != result["config_hash"]:
            raise ResultsError(
                f"run {key}: config differs from the baseline's (hash {result['config_hash'][:10]} "
                f"vs {base['config_hash'][:10]}); rerun with the baseline's settings or --update"
            )
        for metric in baseline["metrics"]:
            if metric not in base["metrics"]:
                continue  # not a metric of this task
            if metric not in result["metrics"]:
                raise ResultsError(f"run {key} lacks metric {metric}")
            higher = base.get("higher_is_better", {}).get(metric, result["higher_is_better"].get(metric))
            if higher is None:
                raise ResultsError(f"metric {metric} has no direction (higher_is_better)")
            tol = baseline["tolerances"].get(metric, baseline.get("default_tolerance", DEFAULT_TOLERANCE))
            if not isinstance(result["metrics"][metric], (int, float)) or isinstance(result["metrics"][metric], bool):
                raise ResultsError(f"run {key}: metric {metric} is not a number ({result['metrics'][metric]!r})")
            old, new = float(base["metrics"][metric]), float(result["metrics"][metric])
            slack = tol.get("abs", 0.0) + tol.get("rel", 0.0) * abs(old)
            limit = old - slack if higher else old + slack
            passed = new >= limit if higher else new <= limit
            checks.append(Check(key, metric, old, new, limit, passed and math.isfinite(new)))
    ratios = []
    for spec in baseline["ratios"]:
        for side in ("numerator", "denominator"):
            if spec.get(side) not in current:
                raise ResultsError(f"ratio {spec.get('name')}: no result for {spec.get(side)}")
        metric = spec["metric"]
        sides = []
        for side in ("numerator", "denominator"):
            value = current[spec[side]]["metrics"].get(metric)
            if not _number(value):
                raise ResultsError(f"ratio {spec['name']}: {spec[side]} has no finite {metric} (got {value!r})")
            sides.append(float(value))
        if sides[1] == 0:
            raise ResultsError(f"ratio {spec['name']}: {metric} of {spec['denominator']} is 0 (no ratio can be taken)")
        value = sides[0] / sides[1]
        low, high = spec.get("min", -math.inf), spec.get("max", math.inf)
        limit = low if "min" in spec else high
        ratios.append(Check(spec["name"], f"{metric} ratio", limit, value, limit, low <= value <= high))
    return checks, ratios


def make_baseline(results: list[dict], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A new baseline from `results`, keeping the previous baseline's gate settings."""
    previous = previous or {}
    metrics = previous.get("metrics") or sorted({m for r in results for m in _quality(r) if m in r["metrics"]})
    runs = {}
    for r in results:
        runs[run_key(r)] = {
            "config_hash": r["config_hash"],
            "metrics": {m: r["metrics"][m] for m in metrics if m in r["metrics"]},
            "higher_is_better": {m: r["higher_is_better"][m] for m in metrics if m in r["higher_is_better"]},
        }
    return {
        "schema": SCHEMA,
        "metrics": metrics,
        "tolerances": previous.get("tolerances", {}),
        "default_tolerance": previous.get("default_tolerance", DEFAULT_TOLERANCE),
        "ratios": previous.get("ratios", []),
        "runs": runs,
    }


def _quality(result: dict) -> set[str]:
    """The task's own directional metrics (quality), not the engine's speed and memory."""
    from streambench.results.schema import ENGINE_DIRECTIONS

    return {m for m in result["higher_is_better"] if m not in ENGINE_DIRECTIONS}
