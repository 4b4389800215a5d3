"""Compare-policies reports: report.md, a self-contained report.html (plots embedded), PNG plots.

Runs are grouped into comparable groups (same task, task arguments and model); each group gets
its table (policies side by side, the best value of each column marked when one run holds it)
and its plots (matplotlib, Agg), one colour per policy across the report, dense as a black dashed
reference, legends beside the axes: per-position NLL over the stream (log scale, the plot
StreamingLLM's paper is known for), KV-cache tokens over the stream, needle depth x length
heatmaps, cache maps (which original positions are held at each step), fact retention against
age, tokens/s and accuracy against the budget, quality against KV MiB with the Pareto frontier,
the rolling RPS win rate.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from streambench.engine.meter import peak_memory_mib

ENGINE_COLUMNS = (
    ("eval tok/s", "tokens_per_s", True),
    ("decode tok/s", "decode_tokens_per_s", True),
    ("p95 ms", "latency_p95_ms", False),
    ("peak mem MiB", None, False),
    ("KV MiB", "kv_mib_peak", False),
)


def _task_columns(rows: list[dict]):
    from streambench.tasks import TASKS

    cls = TASKS.get(rows[0]["config"]["task"]["name"])
    directions = {k: v for r in rows for k, v in r.get("higher_is_better", {}).items()}
    return [(h, key, directions.get(key)) for h, key in cls.columns_for(rows)]


def _value(result: dict, key: str | None):
    m = result["metrics"]
    return peak_memory_mib(m) if key is None else m.get(key)


def _budget(result: dict):
    b = result["config"]["policy"]["args"].get("budget")
    return b if b is not None else "all"


def group(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs by (task, model), as the gate and `streambench list` see them."""
    groups = defaultdict(list)
    for r in results:
        groups[(r["config"]["task"]["name"], r["config"]["model"])].append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: (str(_budget(r)), _name(r)))
    return dict(groups)


def comparable(results: list[dict]) -> list[dict]:
    """Groups of runs whose numbers compare: same task, task arguments (text, tokens, ...) and
    model. Each: {"task", "model", "rows", "title", "prefix"} (prefix: of its plot files, the task's
    name, numbered when the task has several groups)."""
    from streambench.sanitize import slug

    keyed = defaultdict(list)
    for r in results:
        task = r["config"]["task"]
        keyed[
            (task["name"], r["config"]["model"], json.dumps(task.get("args", {}), sort_keys=True, default=str))
        ].append(r)
    groups, per_task = [], defaultdict(list)
    for (task, model, args), rows in keyed.items():
        rows.sort(
            key=lambda r: (isinstance(_budget(r), str), _budget(r) if isinstance(_budget(r), int) else 0, _name(r))
        )
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

    columns = _task_columns(rows) + list(ENGINE_COLUMNS)
    if any("kv_sliding_mib_peak" in r["metrics"] for r in rows):  # hybrid: KV per layer kind
        columns += [("KV MiB full", "kv_full_mib_peak", False), ("KV MiB sliding", "kv_sliding_mib_peak", None)]
    best = {}
    for header, key, higher in columns:  # compared as shown: two cells that read alike are a tie
        values = [_shown(v) for v in (_value(r, key) for r in rows) if isinstance(v, (int, float)) and np.isfinite(v)]
        if higher is not None and values and len(rows) > 1:
            top = max(values) if higher else min(values)
            if values.count(top) == 1:
                best[header] = top
    cell = _md_cell if fmt == "md" else _html_cell
    body = []
    for r in rows:
        ratio = r.get("budget_ratio")
        shown = (
            f"{_budget(r)} ({100 * ratio['ratio']:g}%)" if isinstance(ratio, dict) and "ratio" in ratio else _budget(r)
        )
        line = [cell(_name(r)), cell(shown)]
        for header, key, _ in columns:
            v = _value(r, key)
            text = cell(f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
            if header in best and isinstance(v, (int, float)) and _shown(v) == best[header]:
                text = f"**{text}**" if fmt == "md" else f"<b>{text}</b>"
            line.append(text)
        body.append(line)
    headers = [cell(h) for h in ["policy", "budget"] + [h for h, _, _ in columns]]
    # Every cell is escaped above, so the only markup in the HTML table is the <b> added here.
    return tabulate(body, headers=headers, tablefmt="github" if fmt == "md" else "unsafehtml", disable_numparse=True)


def _shown(v) -> float:
    return float(f"{v:.4g}") if isinstance(v, float) else v


# ---- hostile strings: labels, model names, task arguments come from users and result files --------
def _name(result: dict) -> str:
    return str(result.get("label") or result["config"]["policy"]["name"])


# Control characters (NUL, ESC, C1) and lone surrogates from prompts, answers or labels: shown as
# escapes, never written raw into report.md / report.html (a lone surrogate cannot even be encoded).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _visible(value) -> str:
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", str(value)
    )


def _html_cell(value) -> str:
    return html.escape(" ".join(_visible(value).split()), quote=True)


def _md_cell(value) -> str:
    """Markdown renderers pass inline HTML through: escape it, and the table's pipes."""
    return html.escape(" ".join(_visible(value).split()), quote=False).replace("|", "\\|").replace("`", "\\`")


def _legend(text) -> str:
    """Matplotlib parses $...$ as math text (a parse error for arbitrary labels) and drops legend
    entries whose label starts with an underscore."""
    text = " ".join(str(text).split()).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


# ---- plots ----------------------------------------------------------------------------------------
REFERENCE = "dense"  # drawn as a black dashed reference, not as one more coloured curve


def _palette(results: list[dict]) -> dict[str, str]:
    """One colour per policy name in every plot of a report; dense is the black reference."""
    cycle = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#17becf",
        "#bcbd22",
        "#7f7f7f",
        "#aec7e8",
        "#ffbb78",
        "#98df8a",
        "#ff9896",
        "#c5b0d5",
        "#c49c94",
    ]
    names = sorted({_name(r) for r in results} - {REFERENCE})
    color = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    color[REFERENCE] = "black"
    return color


def _style(r: dict, color: dict) -> dict:
    name = _name(r)
    if name == REFERENCE:
        return {"color": "black", "linestyle": "--", "label": _legend(f"{name} (reference)")}
    return {"color": color[name], "label": _legend(name)}


def _outside(ax, **kw) -> None:
    """The legend beside the axes, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def _budgets_of(rows: list[dict]) -> list[str]:
    return sorted({str(_budget(r)) for r in rows if _budget(r) != "all"}, key=lambda b: (len(b), b))


def plots(results: list[dict], out: Path, groups: list[dict] | None = None) -> list[tuple[str, str, int]]:
    """Write the PNG plots; returns (file name, caption, index of its group in `groups`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    color = _palette(results)

    def save(fig, name, caption, g):
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append((name, caption, g))

    for g, grp in enumerate(groups if groups is not None else comparable(results)):
        rows, pre, title = grp["rows"], grp["prefix"], grp["title"]
        ppl = [r for r in rows if "nll" in r.get("curves", {})]
        for budget in _budgets_of(ppl):
            chosen = [r for r in ppl if str(_budget(r)) in (budget, "all")]
            fig, ax = plt.subplots(figsize=(7, 4))
            longest = max(r["curves"]["nll"]["index"][-1] + r["curves"]["nll"].get("binned", 1) for r in chosen)
            span = max(1, min(512, longest // 64))  # tokens per running mean, the same for every curve
            # longest first: a short stream (recompute-window over 2K beside 64K) is drawn on top
            for r in sorted(chosen, key=lambda r: -r["curves"]["nll"]["index"][-1]):
                curve = r["curves"]["nll"]
                values = np.asarray(curve["value"], dtype=float)
                window = max(1, min(len(values), round(span / curve.get("binned", 1))))
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                ends = np.asarray(curve["index"][window - 1 :]) + curve.get("binned", 1)  # each mean's last token
                ax.plot(ends, np.exp(smooth), linewidth=1, **_style(r, color))
            ax.set_yscale("log")
            ax.set_xlabel("position in the stream (tokens)")
            ax.set_ylabel(f"perplexity (running mean of NLL over {span} tokens)")
            ax.set_title(f"Streaming perplexity, budget {budget}\n{_legend(title)}", fontsize=10)
            _outside(ax)
            save(
                fig,
                f"{pre}ppl_over_stream_b{budget}.png",
                f"{title}: per-position perplexity over the stream at budget {budget} (log scale)",
                g,
            )
        if ppl:
            fig, ax = plt.subplots(figsize=(7, 4))
            for r in ppl:
                curve = r["curves"].get("kv_tokens")
                if curve:
                    style = _style(r, color)
                    style["label"] = _legend(
                        f"{_name(r)} b{_budget(r)}" if _budget(r) != "all" else f"{_name(r)} (no budget)"
                    )
                    if len({_budget(x) for x in ppl if _name(x) == _name(r)}) > 1:
                        style["alpha"] = 0.5 + 0.5 * (
                            _budget(r) == max(_budget(x) for x in ppl if _name(x) == _name(r))
                        )
                    ax.plot([0, *curve["index"]], [0, *curve["value"]], **style)  # from an empty cache
            ax.set_xlabel("tokens fed")
            ax.set_ylabel("tokens in the KV cache")
            ax.set_title(f"KV-cache size over the stream\n{_legend(title)}", fontsize=10)
            _outside(ax)
            save(
                fig,
                f"{pre}kv_over_stream.png",
                f"{title}: KV-cache tokens held over the stream, per policy and budget",
                g,
            )
        for budget in _budgets_of(rows) or ["all"]:
            chosen = [r for r in rows if str(_budget(r)) in (budget, "all")]
            _needle_heatmaps(
                plt, [r for r in chosen if "needle_grid" in r.get("curves", {})], budget, title, pre, g, save
            )
            _cache_maps(plt, [r for r in chosen if "cache_map" in r.get("curves", {})], budget, title, pre, g, save)
            kept = [r for r in chosen if "retention_by_turns" in r.get("curves", {})]
            if kept:
                fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
                for key, ax, unit in (
                    ("retention_by_turns", axes[0], "turns"),
                    ("retention_by_tokens", axes[1], "tokens"),
                ):
                    for r in kept:
                        curve = r["curves"].get(key)
                        if curve:
                            ax.plot(
                                curve["index"],
                                curve["value"],
                                marker="." if unit == "turns" else None,
                                **_style(r, color),
                            )
                    ax.set_xlabel(f"age of the fact token ({unit})")
                    ax.set_ylabel("share still in the cache")
                    ax.set_ylim(-0.03, 1.03)
                _outside(axes[1])
                fig.suptitle(
                    f"What the cache keeps of the tagged facts, budget {budget}\n{_legend(title)}", fontsize=10
                )
                save(
                    fig,
                    f"{pre}retention_b{budget}.png",
                    f"{title}: share of the fact tokens still cached against their age, budget {budget}",
                    g,
                )
        budgets = [r for r in rows if isinstance(_budget(r), int)]
        if len({_budget(r) for r in budgets}) > 1:
            fig, ax = plt.subplots(figsize=(7, 4))
            for chosen in _by_label(budgets).values():
                chosen.sort(key=_budget)
                ax.plot(
                    [_budget(r) for r in chosen],
                    [r["metrics"]["tokens_per_s"] for r in chosen],
                    marker="o",
                    **_style(chosen[0], color),
                )
            ax.set_xlabel("cache budget (keys)")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"Throughput against the cache budget\n{_legend(title)}", fontsize=10)
            _outside(ax)
            save(
                fig,
                f"{pre}tokens_per_s_vs_budget.png",
                f"{title}: tokens per second against the cache budget, per policy",
                g,
            )
            scored = [r for r in budgets if "accuracy" in r["metrics"] or "key_accuracy" in r["metrics"]]
            if scored:
                fig, ax = plt.subplots(figsize=(7, 4))
                for label, chosen in _by_label(scored).items():
                    chosen.sort(key=_budget)
                    key = "key_accuracy" if "key_accuracy" in chosen[0]["metrics"] else "accuracy"
                    style = _style(chosen[0], color)
                    style["label"] = _legend(f"{label} {key}")
                    ax.plot([_budget(r) for r in chosen], [r["metrics"][key] for r in chosen], marker="o", **style)
                ax.set_xlabel("cache budget (keys)")
                ax.set_ylabel("accuracy")
                ax.set_title(f"Accuracy against the cache budget\n{_legend(title)}", fontsize=10)
                _outside(ax)
                save(
                    fig,
                    f"{pre}accuracy_vs_budget.png",
                    f"{title}: dialogue accuracy against the cache budget, per policy",
                    g,
                )
        _pareto(plt, rows, title, pre, g, save, color)
        rps = [r for r in rows if any(k.startswith("rolling_win_rate_") for k in r.get("curves", {}))]
        if rps:
            fig, ax = plt.subplots(figsize=(7, 4))
            styles = ["-", "--", ":", "-."]
            for r in rps:
                players = [k for k in r["curves"] if k.startswith("rolling_win_rate_")]
                for i, key in enumerate(players):
                    curve = r["curves"][key]
                    style = _style(r, color)
                    style.update(
                        linestyle=styles[i % len(styles)], label=_legend(f"{_name(r)} b{_budget(r)} vs {key[17:]}")
                    )
                    ax.plot(curve["index"], curve["value"], **style)
            ax.axhline(1 / 3, color="grey", linestyle=":", label="random play")
            ax.set_xlabel("round")
            ax.set_ylabel("win rate (rolling, 50 rounds)")
            ax.set_title(f"Rock-Paper-Scissors win rate over rounds\n{_legend(title)}", fontsize=10)
            _outside(ax)
            save(fig, f"{pre}rps_rolling_win_rate.png", f"{title}: rolling win rate over Rock-Paper-Scissors rounds", g)
    return made


def _panels(plt, count: int, width: float = 3.2, height: float = 3.0):
    columns = min(count, 4)
    lines = -(-count // columns)
    fig, axes = plt.subplots(
        lines, columns, figsize=(width * columns + 1.2, height * lines + 0.9), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat[:count])


def _needle_heatmaps(plt, rows, budget, title, pre, g, save) -> None:
    """Depth x length per policy (as kvpress and KVCache-Factory draw them): colour the exact
    match over the trials, text the answer NLL."""
    if not rows:
        return
    fig, axes = _panels(plt, len(rows))
    image = None
    for ax, r in zip(axes, rows):
        grid = r["curves"]["needle_grid"]
        match = np.asarray(grid["match"], dtype=float)
        nll = np.asarray(grid["answer_nll"], dtype=float)
        image = ax.imshow(match, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]], fontsize=8)
        ax.set_yticks(range(len(grid["depths"])), [f"{d}%" for d in grid["depths"]], fontsize=8)
        for (i, j), value in np.ndenumerate(nll):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("stream length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        ax.set_title(_legend(f"{_run_name(r)}: {r['metrics'].get('exact_match', float('nan')):.2f}"), fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="exact match")
    fig.suptitle(
        f"Needle in a haystack, budget {budget}: exact match (colour), answer NLL (text)\n{_legend(title)}", fontsize=10
    )
    save(
        fig,
        f"{pre}needle_heatmap_b{budget}.png",
        f"{title}: needle exact match per depth and length (colour; the number is the answer's NLL), budget {budget}",
        g,
    )


def _cache_maps(plt, rows, budget, title, pre, g, save) -> None:
    """Which original positions the cache holds at each step of the run's first stream; shade:
    share of layers and heads keeping them; red lines: tagged fact tokens."""
    if not rows:
        return
    fig, axes = _panels(plt, len(rows), 3.4, 3.0)
    mesh = None
    for ax, r in zip(axes, rows):
        cmap = r["curves"]["cache_map"]
        fed, width, columns = cmap["fed"], cmap["bin"], cmap["columns"]
        height = max((max(c["rows"]) + 1 for c in columns if c["rows"]), default=1)
        grid = np.full((height, len(columns)), np.nan)
        for j, c in enumerate(columns):
            grid[c["rows"], j] = c["share"]
        edges = np.concatenate([[0], np.asarray(fed, dtype=float)])
        if len(edges) > 2 and edges[1] > edges[2] - edges[1]:
            edges[0] = max(0.0, edges[1] - (edges[2] - edges[1]))
        mesh = ax.pcolormesh(edges, np.arange(height + 1) * width, grid, cmap="viridis", vmin=0, vmax=1, shading="flat")
        for a, b in cmap.get("facts", []):
            ax.axhspan(a, b, color="red", alpha=0.3, linewidth=0)
            ax.plot([edges[0]], [(a + b) / 2], marker=">", color="red", markersize=4, clip_on=False)
        ax.set_xlabel("tokens fed", fontsize=8)
        ax.set_ylabel("original position", fontsize=8)
        ax.set_title(_legend(_run_name(r)), fontsize=9)
        ax.tick_params(labelsize=7)
    fig.colorbar(mesh, ax=axes, shrink=0.8, label="share of layers x heads keeping it")
    fig.suptitle(
        f"Cache maps, budget {budget} (first stream of each run; red: tagged fact tokens)\n{_legend(title)}",
        fontsize=10,
    )
    save(
        fig,
        f"{pre}cache_map_b{budget}.png",
        f"{title}: original positions held in the cache over the stream, budget {budget}",
        g,
    )


def _pareto(plt, rows, title, pre, g, save, color) -> None:
    """Each policy's quality metric against its KV MiB across budgets, the frontier marked."""
    from streambench.tasks import TASKS

    if not rows:
        return
    try:
        cls = TASKS.get(rows[0]["config"]["task"]["name"])
    except Exception:
        return
    key = getattr(cls, "quality", None)
    points = [(r["metrics"].get("kv_mib_peak"), r["metrics"].get(key), r) for r in rows]
    points = [
        (x, y, r)
        for x, y, r in points
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and np.isfinite(x) and np.isfinite(y) and x > 0
    ]
    if key is None or len({_budget(r) for _, _, r in points if isinstance(_budget(r), int)}) < 2:
        return
    higher = {**cls.higher_is_better}.get(key, True)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for _label, chosen in _by_label([r for _, _, r in points]).items():
        chosen.sort(key=lambda r: r["metrics"]["kv_mib_peak"])
        ax.plot(
            [r["metrics"]["kv_mib_peak"] for r in chosen],
            [r["metrics"][key] for r in chosen],
            marker="o",
            **_style(chosen[0], color),
        )
        for r in chosen:
            ax.annotate(
                str(_budget(r)),
                (r["metrics"]["kv_mib_peak"], r["metrics"][key]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    frontier, best = [], None
    for x, y, _r in sorted(points, key=lambda p: (p[0], -p[1] if higher else p[1])):
        if best is None or (y > best if higher else y < best):
            frontier.append((x, y))
            best = y
    fx, fy = zip(*frontier)
    ax.step(fx, fy, where="post", color="grey", linewidth=3, alpha=0.35, label="frontier", zorder=0)
    ax.scatter(fx, fy, s=80, facecolors="none", edgecolors="grey", zorder=3)
    for _x, y, r in points:
        if _name(r) == REFERENCE:  # dense: the quality every budget is measured against
            ax.axhline(y, color="black", linestyle=":", linewidth=0.8)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ticks = sorted({round(x, 3) for x, _, _ in points})
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])  # the KV sizes measured, not decades
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV cache, peak MiB (log)")
    ax.set_ylabel(f"{key} ({'higher' if higher else 'lower'} is better)")
    if key == "ppl":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_title(f"Quality against KV memory across budgets (labels: budget)\n{_legend(title)}", fontsize=10)
    _outside(ax)
    save(
        fig,
        f"{pre}pareto_{key}_vs_kv.png",
        f"{title}: {key} against peak KV MiB across budgets, the Pareto frontier in grey",
        g,
    )


def _run_name(r: dict) -> str:
    return f"{_name(r)} b{_budget(r)}" if _budget(r) != "all" else f"{_name(r)} (no budget)"


def _by_label(results: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in results:
        out[_name(r)].append(r)
    return dict(out)


# ---- documents ------------------------------------------------------------------------------------
def _extra_tables(rows: list[dict]):
    """The task's own report tables (mtbench: answers side by side); none for an unknown task."""
    from streambench.tasks import TASKS

    try:
        cls = TASKS.get(rows[0]["config"]["task"]["name"])
    except Exception:  # a result of a task not installed here
        return []
    try:
        return cls.report_tables(rows)
    except (KeyError, TypeError, ValueError, AttributeError):  # hand-edited records
        return []


def write_report(results: list[dict], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = comparable(results)
    try:
        figures = plots(results, out, groups)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # curves of a hand-edited or foreign result
        import warnings

        from streambench.errors import DataWarning

        warnings.warn(
            f"plots skipped: a result's curves or metrics are malformed ({type(exc).__name__}: {exc})", DataWarning
        )
        figures = []
    lead = (
        f"{len(results)} runs in {len(groups)} comparable groups (same task, arguments and model). "
        "Best value per column in bold, within a group, never on a tie."
    )
    md = ["# streambench report", "", lead, ""]
    page = [f"<h1>streambench report</h1><p>{html.escape(lead)}</p>"]
    for g, grp in enumerate(groups):
        rows = grp["rows"]
        md += [f"## {_md_cell(grp['title'])}", "", table(rows, "md"), ""]
        page.append(f"<h2>{_html_cell(grp['title'])}</h2>{table(rows, 'html')}")
        for title, headers, body in _extra_tables(rows):
            md += [
                f"### {_md_cell(title)}",
                "",
                "| " + " | ".join(_md_cell(h) for h in headers) + " |",
                "|" + " --- |" * len(headers),
                *("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in body),
                "",
            ]
            head = "".join(f"<th>{_html_cell(h)}</th>" for h in headers)
            cells = "".join(
                "<tr>" + "".join(f"<td class='text'>{_html_cell(c)}</td>" for c in line) + "</tr>" for line in body
            )
            page.append(f"<h3>{_html_cell(title)}</h3><table class='text'><tr>{head}</tr>{cells}</table>")
        for name, caption, _ in [f for f in figures if f[2] == g]:
            md += [f"![{_md_cell(caption)}]({name})", "", _md_cell(caption), ""]
            data = base64.b64encode((out / name).read_bytes()).decode()
            page.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    md += ["## Runs", ""]
    page.append("<h2>Runs</h2>")
    for r in results:
        env = r.get("environment", {})
        where = f"{env.get('device_name', '?')}, torch {env.get('packages', {}).get('torch', '?')}, git {str(env.get('git_commit'))[:10]}"
        config = json.dumps(r["config"], sort_keys=True)
        md += [f"- {_md_cell(r['run_id'])} ({_md_cell(where)}): {_md_cell(config)}"]
        page.append(
            f"<details><summary><code>{_html_cell(r['run_id'])}</code> ({_html_cell(where)})</summary>"
            f"<pre>{html.escape(json.dumps(r['config'], indent=1, sort_keys=True))}</pre></details>"
        )
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}td.text{text-align:left;vertical-align:top;font-size:90%}"
        "table.text{table-layout:fixed;width:100%}table.text th:first-child{width:9em}table.text th{text-align:left}"
        "img{max-width:100%}figure{margin:1em 0}"
    )
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        # Defence in depth behind the escaping: the page may show inline styles and embedded PNGs, nothing else.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>streambench report</title><style>{style}</style>"
        f"</head><body>{''.join(page)}</body></html>\n",
        encoding="utf-8",
    )
    return [out / "report.md", out / "report.html", *(out / name for name, _, _ in figures)]
