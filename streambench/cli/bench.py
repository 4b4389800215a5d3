"""`streambench bench`: the speed benchmark's flags and verdicts (runs/speed.py measures)."""

from __future__ import annotations

from pathlib import Path

import click

from streambench.cli.exits import UserError, user_errors
from streambench.cli.options import device_options
from streambench.cli.progress import quiet_libraries


@click.command(name="bench")
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
@click.option(
    "--group",
    "group_policies",
    default="sirllm,h2o,tova,knorm,snapkv",
    show_default=True,
    help="Policies streamed one at a time and as one group (one batch, a stream each) ('' to skip).",
)
@click.option("--group-tokens", type=int, default=512, show_default=True, help="Tokens streamed in that comparison.")
@click.option(
    "--replies",
    type=int,
    default=4,
    show_default=True,
    help="Candidate replies scored one forward each and as one tree forward (0 to skip).",
)
@click.option(
    "--dialogue",
    type=int,
    default=4,
    show_default=True,
    help="Grocery episodes played one at a time and as one ragged batch (0 to skip).",
)
@click.option("--steps", type=int, default=32, show_default=True, help="Measured decode steps per measurement.")
@click.option("--burn", type=int, default=4, show_default=True, help="Burn-in steps per measurement.")
@device_options
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="Also write the numbers here.")
@user_errors
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
    group_policies,
    group_tokens,
    replies,
    dialogue,
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
        streambench bench --policy '' --budgets '' --batch-sizes '' --exact-budgets '' --group '' --replies 0 --dialogue 0 --soak 1000000
        streambench bench --policy '' --budgets '' --batch-sizes '' --exact-budgets '' --group-tokens 2048
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
    grouped = [p.strip() for p in group_policies.split(",") if p.strip()]
    if grouped:
        from streambench.engine.session import check_group
        from streambench.errors import ConfigError

        try:
            check_group([build_policy(PolicySpec(name), budget) for name in grouped])
        except ConfigError as exc:
            raise UserError(f"--group: {exc}") from None
    if group_tokens < 2 or replies < 0 or dialogue < 0 or dialogue == 1:
        raise UserError("--group-tokens must be >= 2, --replies >= 0, --dialogue 0 or >= 2")
    if soak:
        build_policy(PolicySpec("streamingllm"), soak_budget)
    if steps < 2 or burn < 0 or any(b < 1 for b in batches) or soak < 0 or soak_chunk < 1:
        raise UserError("--steps must be >= 2, --burn >= 0, --batch-sizes >= 1, --soak >= 0, --soak-chunk >= 1")
    quiet_libraries()
    lm = models.load(model, device, dtype)
    out = {}
    if (
        names or sizes or batches or exact_sizes or grouped or replies or dialogue
    ):  # `... --group '' --replies 0 --dialogue 0 --soak N`: the soak alone
        out = run_bench(lm, names, budget, sizes, steps, burn, tuple(batches))
        if exact_sizes:
            from streambench.runs.speed import exact_vs_token

            out["exact"] = exact_vs_token(lm, exact_sizes, exact_tokens, steps, min(burn, 2))
        if grouped:
            from streambench.runs.speed import grouped_vs_alone

            out["grouped"] = grouped_vs_alone(lm, grouped, budget, group_tokens)
        if replies:
            from streambench.runs.speed import tree_vs_branches

            out["replies"] = tree_vs_branches(
                lm, "streamingllm", budget, 2 * budget, replies, max(1, min(12, budget // 4 - 2)), max(2, steps // 4)
            )
        if dialogue:
            from streambench.runs.speed import dialogue_batched_vs_alone

            out["dialogue"] = dialogue_batched_vs_alone(lm, "streamingllm", max(budget, 512), dialogue)
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
