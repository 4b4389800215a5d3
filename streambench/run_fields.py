"""What every result names, read one way everywhere: task, model, policy, label, budget.

A result is the JSON dict `runs/runner.py` writes (schema in `results/schema.py`); these are its
typed accessors, used by the results layer (table, report, gate, store, filters) and by tasks'
presentation hooks (`Task.notes`, `report_tables`), which is why they sit below both.

An unbounded budget (dense) is `None` in the result. People read it as "all" (`budget_text`);
identifiers spell it "inf" (`budget_id`: run ids `...-binf-...` and gate baseline keys, kept as
they were so that every stored result and baseline still matches).
"""

from __future__ import annotations

from typing import Any

Result = dict[str, Any]


def task_name(result: Result) -> str:
    return str(result["config"]["task"]["name"])


def task_args(result: Result) -> dict[str, Any]:
    return dict(result["config"]["task"].get("args", {}))


def model_name(result: Result) -> str:
    return str(result["config"]["model"])


def policy_name(result: Result) -> str:
    return str(result["config"]["policy"]["name"])


def label(result: Result) -> str:
    """The run's name in tables, plots and keys: its label, else its policy's name."""
    return str(result.get("label") or policy_name(result))


def budget(result: Result) -> int | None:
    """Keys each query may see, including itself; None: unbounded."""
    value = result["config"]["policy"].get("args", {}).get("budget")
    return None if value is None else int(value)


def budget_text(result: Result, ratio: bool = False) -> str:
    """The budget as a table shows it: "all" when unbounded; with `ratio`, the share of the
    context a ratio budget was given as, e.g. "192 (25%)"."""
    value = budget(result)
    text = "all" if value is None else str(value)
    share = result.get("budget_ratio")
    if ratio and isinstance(share, dict) and "ratio" in share:
        text = f"{text} ({100 * share['ratio']:g}%)"
    return text


def budget_id(result: Result) -> str:
    """The budget in identifiers: the number, or "inf"."""
    value = budget(result)
    return "inf" if value is None else str(value)
