"""Comparable groups of runs and their tables (Markdown and HTML, from the columns the CLI's
table uses: results/table.py), with every string from users and result files escaped."""

from __future__ import annotations

import html
import json
import re
from collections import defaultdict
from typing import Any

import numpy as np

from streambench.results.table import budget_header, columns
from streambench.run_fields import budget, budget_text, label, model_name, task_args, task_name


def group(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs by (task, model), as the gate and `streambench list` see them."""
    groups = defaultdict(list)
    for r in results:
        groups[(task_name(r), model_name(r))].append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: (budget_text(r), label(r)))
    return dict(groups)


def comparable(results: list[dict]) -> list[dict[str, Any]]:
    """Groups of runs whose numbers compare: same task, task arguments (text, tokens, ...) and
    model. Each: {"task", "model", "rows", "title", "prefix"} (prefix: of its plot files, the task's
    name, numbered when the task has several groups)."""
    from streambench.sanitize import slug

    keyed = defaultdict(list)
    for r in results:
        keyed[(task_name(r), model_name(r), json.dumps(task_args(r), sort_keys=True, default=str))].append(r)
    groups: list[dict[str, Any]] = []
    per_task = defaultdict(list)
    for (task, model, args), rows in keyed.items():
        rows.sort(key=lambda r: (budget(r) is None, budget(r) or 0, label(r)))
        per_task[task].append(len(groups))
        groups.append({"task": task, "model": model, "args": json.loads(args), "rows": rows})
    for task, members in per_task.items():
        siblings = [groups[i] for i in members]
        varying = sorted(
            {
                k
                for g in siblings
                for k in g["args"]
                if len({json.dumps(h["args"].get(k), default=str) for h in siblings}) > 1
            }
        )
        for n, g in enumerate(siblings):
            differs = ", ".join(f"{k}={g['args'].get(k)}" for k in varying)
            g["title"] = f"{task} on {g['model']}" + (f" ({differs})" if differs else "")
            g["prefix"] = f"{slug(task, 24)}_" if len(siblings) == 1 else f"{slug(task, 24)}{n + 1}_"
    return groups


def table(rows: list[dict], fmt: str) -> str:
    """tabulate table of comparable runs; the best value per directional column is marked (bold in
    md, <b> in html), only where one run holds it (a tie marks nothing)."""
    from tabulate import tabulate

    shown = columns(rows, latency=True)
    best = {}
    for col in shown:  # compared as shown: two cells that read alike are a tie
        values = [_shown(v) for v in (col.value(r) for r in rows) if isinstance(v, (int, float)) and np.isfinite(v)]
        if col.higher is not None and values and len(rows) > 1:
            top = max(values) if col.higher else min(values)
            if values.count(top) == 1:
                best[col.header] = top
    cell = md_cell if fmt == "md" else html_cell
    body = []
    for r in rows:
        line = [cell(label(r)), cell(budget_text(r, ratio=True))]
        for col in shown:
            v = col.value(r)
            text = cell(f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
            if col.header in best and isinstance(v, (int, float)) and _shown(v) == best[col.header]:
                text = f"**{text}**" if fmt == "md" else f"<b>{text}</b>"
            line.append(text)
        body.append(line)
    headers = [cell(h) for h in ["policy", budget_header(rows)] + [c.header for c in shown]]
    # Every cell is escaped above, so the only markup in the HTML table is the <b> added here.
    return tabulate(body, headers=headers, tablefmt="github" if fmt == "md" else "unsafehtml", disable_numparse=True)


def _shown(v) -> float:
    return float(f"{v:.4g}") if isinstance(v, float) else v


# ---- hostile strings: labels, model names, task arguments come from users and result files --------
# Control characters (NUL, ESC, C1) and lone surrogates from prompts, answers or labels: shown as
# escapes, never written raw into report.md / report.html (a lone surrogate cannot even be encoded).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _visible(value) -> str:
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", str(value)
    )


def html_cell(value) -> str:
    return html.escape(" ".join(_visible(value).split()), quote=True)


def md_cell(value) -> str:
    """Markdown renderers pass inline HTML through: escape it, and the table's pipes."""
    return html.escape(" ".join(_visible(value).split()), quote=False).replace("|", "\\|").replace("`", "\\`")


def legend(text) -> str:
    """Matplotlib parses $...$ as math text (a parse error for arbitrary labels) and drops legend
    entries whose label starts with an underscore."""
    text = " ".join(str(text).split()).replace("$", r"\$")
    return " " + text if text.startswith("_") else text
