"""The results table, built once for every surface: one row per run, the task's own columns
(quality first, `Task.columns_for`), then speed and memory. The CLI prints it after a run or a
sweep (`format_table`, plain text); the report renders the same columns as Markdown and HTML
with the best value of each marked (results/report/tables.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streambench.results.schema import peak_memory_mib
from streambench.run_fields import budget_text, label, task_name


@dataclass(frozen=True)
class Column:
    header: str
    key: str | None  # metric name; None: peak memory (the CUDA allocator's on GPU, else RSS)
    higher: bool | None = None  # better when higher (True), lower (False), or not compared (None)
    fallback: str | None = None  # metric shown where `key` is absent (physical KV: the logical one)

    def value(self, result: dict[str, Any]) -> Any:
        metrics = result["metrics"]
        if self.key is None:
            return peak_memory_mib(metrics)
        return metrics.get(self.key, metrics.get(self.fallback) if self.fallback else None)


def task_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """The task's own columns for these runs, with the directions the results declare."""
    from streambench.tasks import TASKS

    cls = TASKS.get(task_name(rows[0]))
    directions = {k: v for r in rows for k, v in r.get("higher_is_better", {}).items()}
    return [Column(h, key, directions.get(key)) for h, key in cls.columns_for(rows)]


def columns(rows: list[dict[str, Any]], latency: bool = False) -> list[Column]:
    """Every column after policy and budget. `latency` adds the p95 per-token latency (the
    report has room for it; the terminal does not)."""
    present = {k for r in rows for k in r["metrics"]}
    # eval tok/s: tokens through the model per second (a chunked stream's is throughput);
    # decode tok/s: one token per forward, the policy's speed as a decoder
    out = task_columns(rows) + [Column("eval tok/s", "tokens_per_s", True)]
    if "decode_tokens_per_s" in present:
        out.append(Column("decode tok/s", "decode_tokens_per_s", True))
    if latency:
        out.append(Column("p95 ms", "latency_p95_ms", False))
    out += [Column("peak mem MiB", None, False), Column("KV MiB", "kv_mib_peak", False)]
    if "kv_physical_mib_peak" in present:  # lanes keeping unequal counts: logical and physical
        out.append(Column("KV MiB physical", "kv_physical_mib_peak", False, fallback="kv_mib_peak"))
    if "kv_sliding_mib_peak" in present:  # hybrid models: KV per layer kind
        out += [Column("KV MiB full", "kv_full_mib_peak", False), Column("KV MiB sliding", "kv_sliding_mib_peak")]
    if "bank_mib" in present:  # longmem's memory bank, beside the cache
        out.append(Column("bank MiB", "bank_mib", False))
    return out


def budget_header(rows: list[dict[str, Any]]) -> str:
    hybrid = any("kv_sliding_mib_peak" in r["metrics"] for r in rows)
    return "budget (full layers)" if hybrid else "budget"


def format_table(results: list[dict[str, Any]]) -> str:
    """The terminal table: one row per run, floats to two decimals."""
    from tabulate import tabulate

    shown = columns(results)
    headers = ["policy", budget_header(results), *(c.header for c in shown)]
    rows = [[label(r), budget_text(r, ratio=True), *(c.value(r) for c in shown)] for r in results]
    # floats rounded here, not only by floatfmt: tabulate prints a column it takes for text as is
    rows = [[f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in rows]
    return tabulate(rows, headers=headers, floatfmt=".2f")


def table_notes(results: list[dict[str, Any]]) -> str:
    """What the terminal prints under the table: the task's notes (reference points,
    breakdowns) and, for a hybrid model, which layers the budget governs."""
    from streambench.tasks import TASKS

    parts = []
    try:
        notes = TASKS.get(task_name(results[0])).notes(results)
    except Exception:  # (a task not installed here: no notes)
        notes = ""
    if notes:
        parts.append(notes)
    grouped = [r for r in results if isinstance(r.get("info"), dict) and r["info"].get("grouped")]
    if grouped:
        streams = grouped[0]["info"]["grouped"].get("streams", len(grouped))
        names = ", ".join(str(r.get("label", "?")) for r in grouped)
        parts.append(
            f"Grouped: {names} streamed the same tokens as one batch ({streams} streams, each evicting by "
            "its own policy; the numbers each gives alone): their tok/s is the rate each stream advanced at "
            "(--no-group: one at a time)."
        )
    layers = next((r["kv_layers"] for r in results if r.get("kv_layers")), None)
    if layers:
        full, slide = layers["full_attention"], layers["sliding_attention"]
        parts.append(
            f"Hybrid model: the policy governs its {full['layers']} full-attention layers (budget per layer); "
            f"its {slide['layers']} sliding-window layers keep the model's own window of {slide['window']} tokens "
            "(KV MiB = full + sliding)."
        )
    return "\n\n".join(parts)
