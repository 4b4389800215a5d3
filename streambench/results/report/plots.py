"""The report's figures (matplotlib, Agg). One function per curve kind: `PLOTS` maps a kind (a key
of a result's `curves`; a key ending in "_" matches every curve it begins) to the functions that
draw it for a comparable group, given the group's runs that carry it. A plugin task whose results
carry a curve of its own adds its figure with `@register_plot("kind")`. The plots across budgets
(throughput, accuracy, quality against KV memory) read metrics, not curves: `ACROSS_BUDGETS`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streambench.results.report.tables import comparable, legend
from streambench.run_fields import budget, budget_text, label, task_name

REFERENCE = "dense"  # drawn as a black dashed reference, not as one more coloured curve
_CYCLE = (
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
)


@dataclass
class Figures:
    """Where one report's figures go: matplotlib, the folder, one colour per policy across the
    report, and the (file name, caption, group index) of every figure saved."""

    plt: Any
    out: Path
    color: dict[str, str]
    made: list[tuple[str, str, int]] = field(default_factory=list)

    def save(self, fig, name: str, caption: str, grp: dict[str, Any]) -> None:
        fig.savefig(self.out / name, dpi=110, bbox_inches="tight")
        self.plt.close(fig)
        self.made.append((name, caption, grp["index"]))

    def style(self, r: dict) -> dict[str, Any]:
        name = label(r)
        if name == REFERENCE:
            return {"color": "black", "linestyle": "--", "label": legend(f"{name} (reference)")}
        quant = r.get("config", {}).get("kv_quant")
        if isinstance(quant, dict):  # a quantized run: its policy's colour, a dash per width / method
            base = name.rsplit(" ", 1)[0]
            dash = "-." if quant.get("method") == "kivi" else {8: (0, (5, 1)), 4: "--"}.get(quant.get("bits"), ":")
            return {"color": self.color.get(base, self.color[name]), "linestyle": dash, "label": legend(name)}
        return {"color": self.color[name], "label": legend(name)}


PlotFn = Callable[[Figures, dict[str, Any], list[dict]], None]
PLOTS: dict[str, list[PlotFn]] = {}


def register_plot(kind: str) -> Callable[[PlotFn], PlotFn]:
    """Draw `fn(figures, group, rows)` for every comparable group whose runs carry curve `kind`
    (`rows`: those runs). `group` has "title", "prefix" (of the group's file names) and "rows"."""

    def add(fn: PlotFn) -> PlotFn:
        PLOTS.setdefault(kind, []).append(fn)
        return fn

    return add


def _carries(r: dict, kind: str) -> bool:
    curves = r.get("curves", {})
    return kind in curves or (kind.endswith("_") and any(k.startswith(kind) for k in curves))


def plots(results: list[dict], out: Path, groups: list[dict] | None = None) -> list[tuple[str, str, int]]:
    """Write the PNG plots; returns (file name, caption, index of its group in `groups`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({label(r) for r in results} - {REFERENCE})
    color = {n: _CYCLE[i % len(_CYCLE)] for i, n in enumerate(names)}
    color[REFERENCE] = "black"
    figures = Figures(plt, out, color)
    for g, grp in enumerate(groups if groups is not None else comparable(results)):
        grp = {**grp, "index": g}
        for kind, fns in PLOTS.items():
            rows = [r for r in grp["rows"] if _carries(r, kind)]
            if rows:
                for fn in fns:
                    fn(figures, grp, rows)
        for across in ACROSS_BUDGETS:
            across(figures, grp, grp["rows"])
    return figures.made


# ---- helpers ----------------------------------------------------------------------------------------
def _outside(ax, **kw) -> None:
    """The legend beside the axes, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def _budgets_of(rows: list[dict]) -> list[str]:
    return sorted({budget_text(r) for r in rows if budget(r) is not None}, key=lambda b: (len(b), b))


def _per_budget(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(budget, the runs at it plus the unbounded ones), for every budget among the rows ("all"
    alone when none has one)."""
    return [(b, [r for r in rows if budget_text(r) in (b, "all")]) for b in (_budgets_of(rows) or ["all"])]


def _run_name(r: dict) -> str:
    return f"{label(r)} b{budget_text(r)}" if budget(r) is not None else f"{label(r)} (no budget)"


def _by_label(results: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in results:
        out[label(r)].append(r)
    return dict(out)


def _panels(plt, count: int, width: float = 3.2, height: float = 3.0):
    columns = min(count, 4)
    lines = -(-count // columns)
    fig, axes = plt.subplots(
        lines, columns, figsize=(width * columns + 1.2, height * lines + 0.9), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat[:count])


# ---- one function per curve kind --------------------------------------------------------------------
@register_plot("nll")
def ppl_over_stream(fig_: Figures, grp: dict, ppl: list[dict]) -> None:
    """Per-position perplexity over the stream (log scale), one figure per budget: the plot
    StreamingLLM's paper is known for. Curves are running means over one token span for all."""
    plt, title = fig_.plt, grp["title"]
    for b in _budgets_of(ppl):
        chosen = [r for r in ppl if budget_text(r) in (b, "all")]
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
            ax.plot(ends, np.exp(smooth), linewidth=1, **fig_.style(r))
        ax.set_yscale("log")
        ax.set_xlabel("position in the stream (tokens)")
        ax.set_ylabel(f"perplexity (running mean of NLL over {span} tokens)")
        ax.set_title(f"Streaming perplexity, budget {b}\n{legend(title)}", fontsize=10)
        _outside(ax)
        fig_.save(
            fig,
            f"{grp['prefix']}ppl_over_stream_b{b}.png",
            f"{title}: per-position perplexity over the stream at budget {b} (log scale)",
            grp,
        )


@register_plot("nll")
def kv_over_stream(fig_: Figures, grp: dict, ppl: list[dict]) -> None:
    """KV-cache tokens held over the stream (from an empty cache), per policy and budget; a
    policy's smaller budgets drawn fainter."""
    fig, ax = fig_.plt.subplots(figsize=(7, 4))
    for r in ppl:
        curve = r["curves"].get("kv_tokens")
        if curve:
            style = fig_.style(r)
            style["label"] = legend(_run_name(r))
            same = [budget(x) for x in ppl if label(x) == label(r)]
            if len(set(same)) > 1:
                style["alpha"] = 0.5 + 0.5 * (budget(r) == max(same, key=lambda v: -1 if v is None else v))
            ax.plot([0, *curve["index"]], [0, *curve["value"]], **style)  # from an empty cache
    ax.set_xlabel("tokens fed")
    ax.set_ylabel("tokens in the KV cache")
    ax.set_title(f"KV-cache size over the stream\n{legend(grp['title'])}", fontsize=10)
    _outside(ax)
    fig_.save(
        fig,
        f"{grp['prefix']}kv_over_stream.png",
        f"{grp['title']}: KV-cache tokens held over the stream, per policy and budget",
        grp,
    )


@register_plot("needle_grid")
def needle_heatmaps(fig_: Figures, grp: dict, rows: list[dict]) -> None:
    """Depth x length per policy (as kvpress and KVCache-Factory draw them): colour the exact
    match over the trials, text the answer NLL. One figure per budget."""
    title = grp["title"]
    for b, chosen in _per_budget(rows):
        if not chosen:
            continue
        fig, axes = _panels(fig_.plt, len(chosen))
        image = None
        for ax, r in zip(axes, chosen):
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
            ax.set_title(legend(f"{_run_name(r)}: {r['metrics'].get('exact_match', float('nan')):.2f}"), fontsize=9)
        fig.colorbar(image, ax=axes, shrink=0.8, label="exact match")
        fig.suptitle(
            f"Needle in a haystack, budget {b}: exact match (colour), answer NLL (text)\n{legend(title)}", fontsize=10
        )
        fig_.save(
            fig,
            f"{grp['prefix']}needle_heatmap_b{b}.png",
            f"{title}: needle exact match per depth and length (colour; the number is the answer's NLL), budget {b}",
            grp,
        )


@register_plot("cache_map")
def cache_maps(fig_: Figures, grp: dict, rows: list[dict]) -> None:
    """Which original positions the cache holds at each step of the run's first stream; shade:
    share of layers and heads keeping them; red lines: tagged fact tokens. One figure per budget."""
    title = grp["title"]
    for b, chosen in _per_budget(rows):
        if not chosen:
            continue
        fig, axes = _panels(fig_.plt, len(chosen), 3.4, 3.0)
        mesh = None
        for ax, r in zip(axes, chosen):
            cmap = r["curves"]["cache_map"]
            fed, width, columns = cmap["fed"], cmap["bin"], cmap["columns"]
            height = max((max(c["rows"]) + 1 for c in columns if c["rows"]), default=1)
            grid = np.full((height, len(columns)), np.nan)
            for j, c in enumerate(columns):
                grid[c["rows"], j] = c["share"]
            edges = np.concatenate([[0], np.asarray(fed, dtype=float)])
            if len(edges) > 2 and edges[1] > edges[2] - edges[1]:
                edges[0] = max(0.0, edges[1] - (edges[2] - edges[1]))
            mesh = ax.pcolormesh(
                edges, np.arange(height + 1) * width, grid, cmap="viridis", vmin=0, vmax=1, shading="flat"
            )
            for lo, hi in cmap.get("facts", []):
                ax.axhspan(lo, hi, color="red", alpha=0.3, linewidth=0)
                ax.plot([edges[0]], [(lo + hi) / 2], marker=">", color="red", markersize=4, clip_on=False)
            ax.set_xlabel("tokens fed", fontsize=8)
            ax.set_ylabel("original position", fontsize=8)
            ax.set_title(legend(_run_name(r)), fontsize=9)
            ax.tick_params(labelsize=7)
        fig.colorbar(mesh, ax=axes, shrink=0.8, label="share of layers x heads keeping it")
        fig.suptitle(
            f"Cache maps, budget {b} (first stream of each run; red: tagged fact tokens)\n{legend(title)}",
            fontsize=10,
        )
        fig_.save(
            fig,
            f"{grp['prefix']}cache_map_b{b}.png",
            f"{title}: original positions held in the cache over the stream, budget {b}",
            grp,
        )


@register_plot("lane_map")
def lane_maps(fig_: Figures, grp: dict, rows: list[dict]) -> None:
    """Per run, two maps over (layer, KV head) lanes at the question: tokens each lane keeps
    (where the budget went) and the share of the fact's tokens it still holds (which lanes kept
    it); then tokens kept per layer, every run on one axis, beside the budget."""
    title = grp["title"]
    for b, chosen in _per_budget(rows):
        chosen = [r for r in chosen if r["curves"].get("lane_map")]
        if not chosen:
            continue
        fig, axes = fig_.plt.subplots(
            len(chosen), 2, figsize=(11, 1.0 + 1.25 * len(chosen)), squeeze=False, layout="constrained"
        )
        top = max(max(map(max, r["curves"]["lane_map"]["counts"])) for r in chosen) or 1
        meshes = [None, None]
        for (ax_count, ax_fact), r in zip(axes, chosen):
            lanes = r["curves"]["lane_map"]
            for k, (ax, key, vmax, cmap) in enumerate(
                ((ax_count, "counts", top, "magma"), (ax_fact, "facts", 1, "viridis"))
            ):
                grid = np.asarray(lanes[key], dtype=float).T  # (heads, layers)
                meshes[k] = ax.pcolormesh(grid, cmap=cmap, vmin=0, vmax=vmax)
                ax.set_yticks(np.arange(grid.shape[0]) + 0.5, [str(h) for h in range(grid.shape[0])], fontsize=6)
                ax.tick_params(labelsize=7)
                ax.set_ylabel("KV head", fontsize=7)
            ax_count.set_title(f"{legend(_run_name(r))}: tokens kept per lane", fontsize=8)
            ax_fact.set_title(f"{legend(_run_name(r))}: share of the fact held", fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("layer", fontsize=8)
        fig.colorbar(meshes[0], ax=axes[:, 0], shrink=0.8, label="tokens")
        fig.colorbar(meshes[1], ax=axes[:, 1], shrink=0.8, label="share of the fact")
        fig.suptitle(f"Where the budget went, lane by lane, budget {b}\n{legend(title)}", fontsize=10)
        fig_.save(
            fig,
            f"{grp['prefix']}lane_map_b{b}.png",
            f"{title}: tokens kept and the fact's share held per (layer, KV head) lane at the question, budget {b}",
            grp,
        )
        fig, ax = fig_.plt.subplots(figsize=(8, 3.4), layout="constrained")
        for r in chosen:
            per_layer = np.asarray(r["curves"]["lane_map"]["counts"], dtype=float).mean(axis=1)
            ax.step(np.arange(len(per_layer)), per_layer, where="mid", **fig_.style(r))
        if b != "all":
            ax.axhline(float(b), color="grey", linewidth=0.8, linestyle=":", label=f"budget {b}")
        ax.set_xlabel("layer")
        ax.set_ylabel("tokens kept per KV head")
        _outside(ax)
        fig.suptitle(f"Budget by layer at the question, budget {b}\n{legend(title)}", fontsize=10)
        fig_.save(
            fig,
            f"{grp['prefix']}budget_by_layer_b{b}.png",
            f"{title}: tokens kept per layer (mean over its KV heads) at the question, budget {b}",
            grp,
        )


@register_plot("retention_by_turns")
def retention(fig_: Figures, grp: dict, rows: list[dict]) -> None:
    """The share of tagged fact tokens still cached against their age, in turns and in tokens."""
    title = grp["title"]
    for b, kept in _per_budget(rows):
        if not kept:
            continue
        fig, axes = fig_.plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
        for key, ax, unit in (("retention_by_turns", axes[0], "turns"), ("retention_by_tokens", axes[1], "tokens")):
            for r in kept:
                curve = r["curves"].get(key)
                if curve:
                    ax.plot(curve["index"], curve["value"], marker="." if unit == "turns" else None, **fig_.style(r))
            ax.set_xlabel(f"age of the fact token ({unit})")
            ax.set_ylabel("share still in the cache")
            ax.set_ylim(-0.03, 1.03)
        _outside(axes[1])
        fig.suptitle(f"What the cache keeps of the tagged facts, budget {b}\n{legend(title)}", fontsize=10)
        fig_.save(
            fig,
            f"{grp['prefix']}retention_b{b}.png",
            f"{title}: share of the fact tokens still cached against their age, budget {b}",
            grp,
        )


@register_plot("rolling_win_rate_")
def rps_win_rate(fig_: Figures, grp: dict, rps: list[dict]) -> None:
    """The rolling Rock-Paper-Scissors win rate over rounds, one line per run and player."""
    fig, ax = fig_.plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for r in rps:
        players = [k for k in r["curves"] if k.startswith("rolling_win_rate_")]
        for i, key in enumerate(players):
            curve = r["curves"][key]
            style = fig_.style(r)
            style.update(linestyle=styles[i % len(styles)], label=legend(f"{label(r)} b{budget_text(r)} vs {key[17:]}"))
            ax.plot(curve["index"], curve["value"], **style)
    ax.axhline(1 / 3, color="grey", linestyle=":", label="random play")
    ax.set_xlabel("round")
    ax.set_ylabel("win rate (rolling, 50 rounds)")
    ax.set_title(f"Rock-Paper-Scissors win rate over rounds\n{legend(grp['title'])}", fontsize=10)
    _outside(ax)
    fig_.save(
        fig,
        f"{grp['prefix']}rps_rolling_win_rate.png",
        f"{grp['title']}: rolling win rate over Rock-Paper-Scissors rounds",
        grp,
    )


# ---- across budgets: metrics, not curves --------------------------------------------------------------
def throughput_and_accuracy(fig_: Figures, grp: dict, rows: list[dict]) -> None:
    """Tokens/s against the budget, and dialogue accuracy against it, per policy (groups with
    more than one budget)."""
    title, pre = grp["title"], grp["prefix"]
    budgeted = [r for r in rows if budget(r) is not None]
    if len({budget(r) for r in budgeted}) <= 1:
        return
    fig, ax = fig_.plt.subplots(figsize=(7, 4))
    for chosen in _by_label(budgeted).values():
        chosen.sort(key=budget)
        ax.plot(
            [budget(r) for r in chosen],
            [r["metrics"]["tokens_per_s"] for r in chosen],
            marker="o",
            **fig_.style(chosen[0]),
        )
    ax.set_xlabel("cache budget (keys)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Throughput against the cache budget\n{legend(title)}", fontsize=10)
    _outside(ax)
    fig_.save(
        fig, f"{pre}tokens_per_s_vs_budget.png", f"{title}: tokens per second against the cache budget, per policy", grp
    )
    scored = [r for r in budgeted if "accuracy" in r["metrics"] or "key_accuracy" in r["metrics"]]
    if not scored:
        return
    fig, ax = fig_.plt.subplots(figsize=(7, 4))
    for name, chosen in _by_label(scored).items():
        chosen.sort(key=budget)
        key = "key_accuracy" if "key_accuracy" in chosen[0]["metrics"] else "accuracy"
        style = fig_.style(chosen[0])
        style["label"] = legend(f"{name} {key}")
        ax.plot([budget(r) for r in chosen], [r["metrics"][key] for r in chosen], marker="o", **style)
    ax.set_xlabel("cache budget (keys)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy against the cache budget\n{legend(title)}", fontsize=10)
    _outside(ax)
    fig_.save(
        fig, f"{pre}accuracy_vs_budget.png", f"{title}: dialogue accuracy against the cache budget, per policy", grp
    )


def pareto(fig_: Figures, grp: dict, rows: list[dict]) -> None:
    """Each policy's quality metric (`Task.quality`) against its KV MiB across budgets, the
    frontier marked, dense's quality as a dotted reference. Where a run's lanes kept unequal
    counts, a second plot puts every run at its physical KV (every layer at its longest lane:
    what the cache holds, not only what it keeps)."""
    _pareto(fig_, grp, rows, physical=False)
    if any("kv_physical_mib_peak" in r["metrics"] for r in rows):
        _pareto(fig_, grp, rows, physical=True)


def _kv_mib(r: dict, physical: bool):
    metrics = r["metrics"]
    return metrics.get("kv_physical_mib_peak", metrics.get("kv_mib_peak")) if physical else metrics.get("kv_mib_peak")


def _pareto(fig_: Figures, grp: dict, rows: list[dict], physical: bool) -> None:
    from streambench.tasks import TASKS

    title, pre = grp["title"], grp["prefix"]
    if not rows:
        return
    try:
        cls = TASKS.get(task_name(rows[0]))
    except Exception:  # a result of a task not installed here
        return
    key = getattr(cls, "quality", None)
    points = [(_kv_mib(r, physical), r["metrics"].get(key), r) for r in rows]
    points = [
        (x, y, r)
        for x, y, r in points
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and np.isfinite(x) and np.isfinite(y) and x > 0
    ]
    if key is None or len({budget(r) for _, _, r in points if budget(r) is not None}) < 2:
        return
    higher = {**cls.higher_is_better}.get(key, True)
    fig, ax = fig_.plt.subplots(figsize=(7, 4.2))
    for chosen in _by_label([r for _, _, r in points]).values():
        chosen.sort(key=lambda r: _kv_mib(r, physical))
        ax.plot(
            [_kv_mib(r, physical) for r in chosen],
            [r["metrics"][key] for r in chosen],
            marker="o",
            **fig_.style(chosen[0]),
        )
        for r in chosen:
            ax.annotate(
                budget_text(r),
                (_kv_mib(r, physical), r["metrics"][key]),
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
        if label(r) == REFERENCE:  # dense: the quality every budget is measured against
            ax.axhline(y, color="black", linestyle=":", linewidth=0.8)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ticks: list[float] = []
    for t in sorted({round(x, 3) for x, _, _ in points}):  # the KV sizes measured, not decades,
        if not ticks or t / ticks[-1] > 1.4:  # but never two labels over each other
            ticks.append(t)
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"KV cache, peak {'physical ' if physical else ''}MiB (log)")
    ax.set_ylabel(f"{key} ({'higher' if higher else 'lower'} is better)")
    if key == "ppl":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    what = "physical KV memory (every layer at its longest lane)" if physical else "KV memory"
    ax.set_title(f"Quality against {what} across budgets (labels: budget)\n{legend(title)}", fontsize=10)
    _outside(ax)
    fig_.save(
        fig,
        f"{pre}pareto_{key}_vs_{'physical_' if physical else ''}kv.png",
        f"{title}: {key} against peak {'physical ' if physical else ''}KV MiB across budgets, the Pareto frontier in grey",
        grp,
    )


ACROSS_BUDGETS: list[PlotFn] = [throughput_and_accuracy, pareto]
