"""`streambench import`, `export`, `report` and `gate`: results in and out of the store."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from streambench.cli.exits import UserError, one_line, user_errors


@click.command(name="import")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--store", "store_path", default="results/streambench.sqlite", show_default=True)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Import the valid files and list the bad ones (default: any bad file imports nothing).",
)
@user_errors
def import_command(folder, store_path, skip_bad):
    """Bring result JSON files (from `streambench run`) into the store.

    All or nothing: every file is validated first (schema, config, config hash), and with any bad
    file nothing is imported, unless --skip-bad.
    """
    from streambench.results.store import Store, read_folder

    good, bad = read_folder(folder, skip_bad)  # every file validated before the store is opened
    with Store(store_path) as store:
        store.add_all(good)
    count = len(good)
    for _file, reason in bad:
        click.echo(f"skipped {one_line(reason)}", err=True)
    click.echo(f"imported {count} result(s) into {store_path}" + (f"; skipped {len(bad)} bad file(s)" if bad else ""))


@click.command(name="export")
@click.option("--store", "store_path", default="results/streambench.sqlite", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", "out", default="-", help="File to write, or - for standard output.")
@user_errors
def export_command(store_path, fmt, out):
    """Write every run in the store as CSV (one row per run, metrics as columns) or JSON."""
    import csv
    import io
    import json

    from streambench.results.store import Store

    target = None
    if out != "-":
        target = Path(out)
        if target.is_dir() or out.endswith(("/", "\\")):
            raise UserError(f"--out {out} is a folder: name a file, or - for standard output")
        if not target.parent.is_dir():
            raise UserError(f"--out {out}: folder {target.parent} does not exist")
    with Store(store_path, readonly=True) as store:
        rows, results = store.rows(), {r["config_hash"]: r for r in store.results()}
    if fmt == "json":
        text = json.dumps([{**row, "result": results.get(row["config_hash"])} for row in rows], indent=1, default=str)
    else:
        names = sorted({k for r in results.values() for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        base = ["run_id", "status", "label", "task", "policy", "model", "budget", "finished", "error"]
        writer.writerow(base + names)
        for row in rows:
            metrics = results.get(row["config_hash"], {}).get("metrics", {})
            writer.writerow([row[k] for k in base] + [metrics.get(n, "") for n in names])
        text = buffer.getvalue()
    if target is None:
        click.echo(text, nl=False)
    else:
        from streambench.results.schema import write_text_atomic

        write_text_atomic(target, text)
        click.echo(f"wrote {len(rows)} run(s) to {out}")


def _load_results(store_path, paths) -> list[dict]:
    """Results from a store and/or JSON files and folders."""
    from streambench.results.schema import read_result
    from streambench.results.store import Store

    results = []
    if store_path:
        with Store(store_path, readonly=True) as store:
            results += list(store.results())
    for p in paths:
        path = Path(p)
        files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
        results += [read_result(f) for f in files]
    return results


def _filter(results: list[dict], filters: dict) -> list[dict]:
    from streambench import run_fields as field

    def value(r, key):
        return {
            "task": field.task_name(r),
            "policy": field.label(r),
            "model": field.model_name(r),
            "budget": field.budget(r),
        }.get(key)

    return [r for r in results if all(str(value(r, k)) == str(v) for k, v in filters.items())]


@click.command(name="report")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--store", "store_path", default=None, help="SQLite store to report on.")
@click.option(
    "--filter", "filters", multiple=True, metavar="KEY=VALUE", help="task=, policy=, model= or budget= (repeatable)."
)
@click.option("--out", "out", default="report", show_default=True, type=click.Path(file_okay=False))
@user_errors
def report_command(paths, store_path, filters, out):
    """Write report.md, report.html (self-contained) and PNG plots comparing policies.

    \b
    Examples:
        streambench report --store results/streambench.sqlite --out report/
        streambench report results/ --filter task=perplexity
    """
    from streambench.results.report import write_report
    from streambench.values import parse_assignments

    wanted = parse_assignments(filters, "--filter")
    unknown = set(wanted) - {"task", "policy", "model", "budget"}
    if unknown:
        raise UserError(f"unknown --filter key(s) {', '.join(sorted(unknown))} (task, policy, model, budget)")
    if not store_path and not paths:
        raise UserError("nothing to report on: give --store FILE or result files/folders")
    from streambench.sanitize import check_writable

    results = _filter(_load_results(store_path, paths), wanted)
    if not results:
        raise UserError("no results match")
    check_writable(out, "report folder")
    files = write_report(results, out)
    click.echo(f"wrote {', '.join(f.name for f in files)} to {out}/")


@click.command(name="gate")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--baseline", "baseline_path", required=True, type=click.Path(dir_okay=False), help="Baseline JSON.")
@click.option("--store", "store_path", default=None, help="SQLite store holding the current results.")
@click.option("--update", is_flag=True, help="Write the current results as the new baseline (keeps its gate settings).")
@user_errors
def gate_command(paths, baseline_path, store_path, update):
    """Fail (exit 1) when a result is worse than the baseline beyond its tolerance.

    Exit codes: 0 pass, 1 regression, 2 bad input (missing run or metric, mismatched config,
    malformed baseline).

    \b
    Examples:
        streambench gate --baseline baseline.json --store results/streambench.sqlite --update
        streambench gate --baseline baseline.json --store results/streambench.sqlite
    """

    from tabulate import tabulate

    from streambench.results.gate import compare, load_baseline, make_baseline
    from streambench.results.schema import write_json_atomic

    if not store_path and not paths:
        raise UserError("nothing to gate: give --store FILE or result files/folders")
    results = _load_results(store_path, paths)
    if update:
        previous = load_baseline(baseline_path) if Path(baseline_path).exists() else None
        baseline = make_baseline(results, previous)
        write_json_atomic(Path(baseline_path), baseline)
        click.echo(f"wrote a baseline of {len(baseline['runs'])} run(s) to {baseline_path}")
        return
    checks, ratios = compare(load_baseline(baseline_path), results)
    rows = [
        [
            c.run,
            c.metric,
            f"{c.baseline:.6g}",
            f"{c.current:.6g}",
            f"{100 * c.delta:+.3f}%",
            f"{c.limit:.6g}",
            "pass" if c.passed else "REGRESSION",
        ]
        for c in checks
    ]
    rows += [
        [c.run, c.metric, "", f"{c.current:.4g}", "", f"{c.limit:.4g}", "pass" if c.passed else "REGRESSION"]
        for c in ratios
    ]
    click.echo(tabulate(rows, headers=["run", "metric", "baseline", "current", "delta", "limit", "status"]))
    failed = [c for c in checks + ratios if not c.passed]
    click.echo(f"\n{len(checks) + len(ratios) - len(failed)} passed, {len(failed)} failed")
    if failed:
        sys.exit(1)
