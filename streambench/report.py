"""Compare-policies reports: report.md, a self-contained report.html (plots embedded), PNG plots.

Tables: one per task (and model), policies side by side, the best value of each column marked.
Plots (matplotlib, Agg): per-position NLL over the stream (log scale, the plot StreamingLLM's paper
is known for), KV-cache tokens over the stream, tokens/s against the budget, the rolling RPS win
rate, accuracy against the budget.
"""
from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from streambench.metrics import peak_memory_mib

ENGINE_COLUMNS = (("eval tok/s", "tokens_per_s", True), ("decode tok/s", "decode_tokens_per_s", True), ("p95 ms", "latency_p95_ms", False),
                  ("peak mem MiB", None, False), ("KV MiB", "kv_mib_peak", False))


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
    groups = defaultdict(list)
    for r in results:
        groups[(r["config"]["task"]["name"], r["config"]["model"])].append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: (str(_budget(r)), _name(r)))
    return dict(groups)


def table(rows: list[dict], fmt: str) -> str:
    """tabulate table; the best value per directional column is marked (bold in md, <b> in html)."""
    from tabulate import tabulate

    columns = _task_columns(rows) + list(ENGINE_COLUMNS)
    best = {}
    for header, key, higher in columns:
        values = [v for v in (_value(r, key) for r in rows) if isinstance(v, (int, float)) and np.isfinite(v)]
        if higher is not None and values and len(rows) > 1:
            best[header] = max(values) if higher else min(values)
    cell = _md_cell if fmt == "md" else _html_cell
    body = []
    for r in rows:
        line = [cell(_name(r)), cell(_budget(r))]
        for header, key, _ in columns:
            v = _value(r, key)
            text = cell(f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
            if header in best and v == best[header]:
                text = f"**{text}**" if fmt == "md" else f"<b>{text}</b>"
            line.append(text)
        body.append(line)
    headers = [cell(h) for h in ["policy", "budget"] + [h for h, _, _ in columns]]
    # Every cell is escaped above, so the only markup in the HTML table is the <b> added here.
    return tabulate(body, headers=headers, tablefmt="github" if fmt == "md" else "unsafehtml", disable_numparse=True)


# ---- hostile strings: labels, model names, task arguments come from users and result files --------
def _name(result: dict) -> str:
    return str(result.get("label") or result["config"]["policy"]["name"])


def _html_cell(value) -> str:
    return html.escape(" ".join(str(value).split()), quote=True)


def _md_cell(value) -> str:
    """Markdown renderers pass inline HTML through: escape it, and the table's pipes."""
    return html.escape(" ".join(str(value).split()), quote=False).replace("|", "\\|").replace("`", "\\`")


def _legend(text) -> str:
    """Matplotlib parses $...$ as math text (a parse error for arbitrary labels) and drops legend
    entries whose label starts with an underscore."""
    text = " ".join(str(text).split()).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


# ---- plots ----------------------------------------------------------------------------------------
def plots(results: list[dict], out: Path) -> list[tuple[str, str]]:
    """Write the PNG plots; returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    names = sorted({_name(r) for r in results})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}  # one color per policy in every plot

    def save(fig, name, caption):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, caption))

    ppl = [r for r in results if "nll" in r.get("curves", {})]
    for budget in sorted({str(_budget(r)) for r in ppl if _budget(r) != "all"}):
        rows = [r for r in ppl if str(_budget(r)) in (budget, "all")]
        fig, ax = plt.subplots(figsize=(7, 4))
        longest = max(r["curves"]["nll"]["index"][-1] + r["curves"]["nll"].get("binned", 1) for r in rows)
        span = max(1, min(512, longest // 64))  # tokens per running mean, the same for every curve
        # longest first: a short stream (recompute-window over 2K beside 64K) is drawn on top
        for r in sorted(rows, key=lambda r: -r["curves"]["nll"]["index"][-1]):
            curve = r["curves"]["nll"]
            values = np.asarray(curve["value"], dtype=float)
            window = max(1, min(len(values), round(span / curve.get("binned", 1))))
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ends = np.asarray(curve["index"][window - 1 :]) + curve.get("binned", 1)  # each mean's last token
            ax.plot(ends, np.exp(smooth), label=_legend(_name(r)), linewidth=1, color=color[_name(r)])
        ax.set_yscale("log")
        ax.set_xlabel("position in the stream (tokens)")
        ax.set_ylabel(f"perplexity (running mean of NLL over {span} tokens)")
        ax.set_title(f"Streaming perplexity, budget {budget}")
        ax.legend(fontsize=8)
        save(fig, f"ppl_over_stream_b{budget}.png", f"Per-position perplexity over the stream at budget {budget} (log scale)")
    if ppl:
        fig, ax = plt.subplots(figsize=(7, 4))
        once = len({_name(r) for r in ppl}) == len(ppl)  # one curve per policy: its color; else one per curve
        for r in ppl:
            curve = r["curves"].get("kv_tokens")
            if curve:
                ax.plot(curve["index"], curve["value"], color=color[_name(r)] if once else None,
                        label=_legend(f"{_name(r)} b{_budget(r)}" if _budget(r) != "all" else f"{_name(r)} (no budget)"))
        ax.set_xlabel("tokens fed")
        ax.set_ylabel("tokens in the KV cache")
        ax.set_title("KV-cache size over the stream")
        ax.legend(fontsize=7)
        save(fig, "kv_over_stream.png", "KV-cache tokens held over the stream, per policy and budget")
    budgets = [r for r in results if isinstance(_budget(r), int)]
    if len({_budget(r) for r in budgets}) > 1:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows in _by_label(budgets).items():
            rows.sort(key=_budget)
            ax.plot([_budget(r) for r in rows], [r["metrics"]["tokens_per_s"] for r in rows], marker="o", label=_legend(label))
        ax.set_xlabel("cache budget (keys)")
        ax.set_ylabel("tokens/s")
        ax.set_title("Throughput against the cache budget")
        ax.legend(fontsize=8)
        save(fig, "tokens_per_s_vs_budget.png", "Tokens per second against the cache budget, per policy")
        scored = [r for r in budgets if "accuracy" in r["metrics"] or "key_accuracy" in r["metrics"]]
        if scored:
            fig, ax = plt.subplots(figsize=(7, 4))
            for label, rows in _by_label(scored).items():
                rows.sort(key=_budget)
                key = "key_accuracy" if "key_accuracy" in rows[0]["metrics"] else "accuracy"
                ax.plot([_budget(r) for r in rows], [r["metrics"][key] for r in rows], marker="o", label=_legend(f"{label} {key}"))
            ax.set_xlabel("cache budget (keys)")
            ax.set_ylabel("accuracy")
            ax.set_title("Accuracy against the cache budget")
            ax.legend(fontsize=8)
            save(fig, "accuracy_vs_budget.png", "Dialogue accuracy against the cache budget, per policy")
    rps = [r for r in results if any(k.startswith("rolling_win_rate_") for k in r.get("curves", {}))]
    if rps:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rps:
            for key, curve in r["curves"].items():
                if key.startswith("rolling_win_rate_"):
                    ax.plot(curve["index"], curve["value"], label=_legend(f"{_name(r)} b{_budget(r)} vs {key[17:]}"))
        ax.axhline(1 / 3, color="grey", linestyle=":", label="random play")
        ax.set_xlabel("round")
        ax.set_ylabel("win rate (rolling, 50 rounds)")
        ax.set_title("Rock-Paper-Scissors win rate over rounds")
        ax.legend(fontsize=7)
        save(fig, "rps_rolling_win_rate.png", "Rolling win rate over Rock-Paper-Scissors rounds")
    return made


def _by_label(results: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in results:
        out[_name(r)].append(r)
    return dict(out)


# ---- documents ------------------------------------------------------------------------------------
def write_report(results: list[dict], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        figures = plots(results, out)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # curves of a hand-edited or foreign result
        import warnings

        from streambench.errors import DataWarning

        warnings.warn(f"plots skipped: a result's curves or metrics are malformed ({type(exc).__name__}: {exc})", DataWarning)
        figures = []
    groups = group(results)
    md = ["# streambench report", "", f"{len(results)} runs. Best value per column in bold.", ""]
    page = [f"<h1>streambench report</h1><p>{len(results)} runs. Best value per column in bold.</p>"]
    for (task, model), rows in groups.items():
        md += [f"## {_md_cell(task)} on {_md_cell(model)}", "", table(rows, "md"), ""]
        page.append(f"<h2>{html.escape(task)} on {html.escape(model)}</h2>{table(rows, 'html')}")
    if figures:
        md += ["## Plots", ""] + [f"![{caption}]({name})\n\n{caption}\n" for name, caption in figures]
        page.append("<h2>Plots</h2>")
        for name, caption in figures:
            data = base64.b64encode((out / name).read_bytes()).decode()
            page.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    md += ["## Runs", ""]
    page.append("<h2>Runs</h2>")
    for r in results:
        env = r.get("environment", {})
        where = f"{env.get('device_name', '?')}, torch {env.get('packages', {}).get('torch', '?')}, git {str(env.get('git_commit'))[:10]}"
        config = json.dumps(r["config"], sort_keys=True)
        md += [f"- {_md_cell(r['run_id'])} ({_md_cell(where)}): {_md_cell(config)}"]
        page.append(f"<details><summary><code>{html.escape(r['run_id'])}</code> ({html.escape(where)})</summary>"
                    f"<pre>{html.escape(json.dumps(r['config'], indent=1, sort_keys=True))}</pre></details>")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}")
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        # Defence in depth behind the escaping: the page may show inline styles and embedded PNGs, nothing else.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        f"<title>streambench report</title><style>{style}</style>"
        f"</head><body>{''.join(page)}</body></html>\n", encoding="utf-8")
    return [out / "report.md", out / "report.html", *(out / name for name, _ in figures)]
