"""report.md and a self-contained report.html: per comparable group its table, the task's own
tables and its figures; then every run's config. The HTML embeds the PNGs and allows nothing
else (a Content-Security-Policy behind the escaping)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from streambench.results.report.plots import plots
from streambench.results.report.tables import comparable, html_cell, md_cell, table
from streambench.run_fields import task_name


def _extra_tables(rows: list[dict]):
    """The task's own report tables (mtbench: answers side by side); none for an unknown task."""
    from streambench.tasks import TASKS

    try:
        cls = TASKS.get(task_name(rows[0]))
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
        md += [f"## {md_cell(grp['title'])}", "", table(rows, "md"), ""]
        page.append(f"<h2>{html_cell(grp['title'])}</h2>{table(rows, 'html')}")
        for title, headers, body in _extra_tables(rows):
            md += [
                f"### {md_cell(title)}",
                "",
                "| " + " | ".join(md_cell(h) for h in headers) + " |",
                "|" + " --- |" * len(headers),
                *("| " + " | ".join(md_cell(c) for c in line) + " |" for line in body),
                "",
            ]
            head = "".join(f"<th>{html_cell(h)}</th>" for h in headers)
            cells = "".join(
                "<tr>" + "".join(f"<td class='text'>{html_cell(c)}</td>" for c in line) + "</tr>" for line in body
            )
            page.append(f"<h3>{html_cell(title)}</h3><table class='text'><tr>{head}</tr>{cells}</table>")
        for name, caption, _ in [f for f in figures if f[2] == g]:
            md += [f"![{md_cell(caption)}]({name})", "", md_cell(caption), ""]
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
        md += [f"- {md_cell(r['run_id'])} ({md_cell(where)}): {md_cell(config)}"]
        page.append(
            f"<details><summary><code>{html_cell(r['run_id'])}</code> ({html_cell(where)})</summary>"
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
