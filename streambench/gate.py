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
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streambench.errors import ResultsError

SCHEMA = "streambench.baseline/1"
DEFAULT_TOLERANCE = {"rel": 0.002}


def run_key(result: dict) -> str:
    c = result["config"]
    budget = c["policy"]["args"].get("budget")
    return f"{c['task']['name']}/{c['model']}/{result.get('label') or c['policy']['name']}/b{budget if budget is not None else 'inf'}"


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
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"malformed baseline {path}: expected schema {SCHEMA!r}")
    for key, kind in (("runs", dict), ("metrics", list), ("ratios", list), ("tolerances", dict)):
        if not isinstance(data.setdefault(key, kind()), kind):
            raise ResultsError(f"malformed baseline {path}: '{key}' must be a {kind.__name__}")
    for name, run in data["runs"].items():
        if not isinstance(run, dict) or not isinstance(run.get("metrics"), dict):
            raise ResultsError(f"malformed baseline {path}: run {name!r} has no metrics")
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
            raise ResultsError(f"run {key}: config differs from the baseline's (hash {result['config_hash'][:10]} "
                               f"vs {base['config_hash'][:10]}); rerun with the baseline's settings or --update")
        for metric in baseline["metrics"]:
            if metric not in base["metrics"]:
                continue  # not a metric of this task
            if metric not in result["metrics"]:
                raise ResultsError(f"run {key} lacks metric {metric}")
            higher = base.get("higher_is_better", {}).get(metric, result["higher_is_better"].get(metric))
            if higher is None:
                raise ResultsError(f"metric {metric} has no direction (higher_is_better)")
            tol = baseline["tolerances"].get(metric, baseline.get("default_tolerance", DEFAULT_TOLERANCE))
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
        value = current[spec["numerator"]]["metrics"][metric] / current[spec["denominator"]]["metrics"][metric]
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
    return {"schema": SCHEMA, "metrics": metrics, "tolerances": previous.get("tolerances", {}),
            "default_tolerance": previous.get("default_tolerance", DEFAULT_TOLERANCE),
            "ratios": previous.get("ratios", []), "runs": runs}


def _quality(result: dict) -> set[str]:
    """The task's own directional metrics (quality), not the engine's speed and memory."""
    from streambench.results import ENGINE_DIRECTIONS

    return {m for m in result["higher_is_better"] if m not in ENGINE_DIRECTIONS}
