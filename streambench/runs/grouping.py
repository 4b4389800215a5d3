"""Which runs of a plan share one batch: the same stream fed to several policies at once, each
stream evicting by its own policy (engine/session.py `group`). A batch of B one-token forwards
costs far less than B forwards of one token (the weights are read once per step), and the
policies whose keep-set depends on content feed token by token anyway; so a sweep's
content-aware runs over one text finish several times sooner grouped, with the numbers each
gives alone: bit for bit on a CPU in fp32 whose GEMM passes models/few_rows.py's proof (where
every stream evicts in step; snapkv's interval leaves pads: float-close), float-close elsewhere,
where a batch-sensitive policy (knorm) runs alone (tests/engine/test_grouped.py,
tests/runs/test_grouping.py).

A run joins a group only where that is faster and exact: not a policy that feeds exact chunks
alone (dense, window, StreamingLLM: hundreds of tokens per forward beat a token-by-token batch),
nor one a batch cannot carry (a memory bank, recompute, uneven lanes, a kvpress press's hooks),
nor a quantized cache, a CUDA-graph decode, batched texts or a model spread over devices."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streambench.runs.config import RunConfig
    from streambench.runs.runner import PlannedRun
    from streambench.tasks.base import Task

GROUP_LIMIT = 16  # streams per group: beyond this a batch step costs about what separate ones do


def alone_reason(task: Task, item: PlannedRun, config: RunConfig) -> str | None:
    """Why `item` runs alone (None: it may share a batch)."""
    from streambench.engine.session import ungroupable

    policy = item.policy
    if not config.group:
        return "grouping is off (--no-group)"
    why_task = task.group_refusal()
    if why_task is not None:
        return why_task
    if config.batch_size > 1:
        return "--batch-size already batches its texts"
    if config.device_map is not None:
        return "the model is spread over devices"
    if item.quant is not None:
        return "a quantized cache runs alone"
    if item.decode != "eager":
        return "it decodes with CUDA graphs"
    why = ungroupable(policy)  # type: ignore[arg-type]
    if why is not None:
        return why
    sensitive = policy.batch_sensitive  # type: ignore[attr-defined]
    if sensitive is not None and not exact_groups(config):
        return sensitive
    if policy.budget is None:  # type: ignore[attr-defined]
        return "it never evicts: whole chunks alone are faster"
    if task.feeds_exact_chunks(policy):
        return "it feeds exact chunks alone, faster than a token-by-token batch"
    return None


def exact_groups(config: RunConfig) -> bool:
    """Whether a group's streams would compute their one-token steps bit for bit as alone:
    a CPU in fp32 whose GEMM passes models/few_rows.py's proof (the model's own weights are
    proven again when it loads, `runner.run`)."""
    import torch

    from streambench.errors import ConfigError
    from streambench.models.few_rows import exact_products_here
    from streambench.models.loading import resolve_device, resolve_dtype

    try:  # (a plan for a device this machine lacks: the load says so, not the plan)
        device = resolve_device(config.device)
        if device.type != "cpu" or resolve_dtype(config.dtype, device) != torch.float32:
            return False
    except ConfigError:
        return False

    return exact_products_here()


def group_runs(task: Task, runs: list[PlannedRun], config: RunConfig) -> tuple[list[list[int]], dict[int, str]]:
    """(groups: lists of indices into `runs`, each of 2 to GROUP_LIMIT runs; {index: why alone})
    for every other run. Runs group by their budget and, among those observing a query window,
    by its length (one window per batch)."""
    alone: dict[int, str] = {}
    budgets: dict[object, list[int]] = {}
    for i, item in enumerate(runs):
        why = alone_reason(task, item, config)
        if why is not None:
            alone[i] = why
        else:
            budgets.setdefault(item.policy.budget, []).append(i)  # type: ignore[attr-defined]
    groups: list[list[int]] = []
    for members in budgets.values():
        by_window: dict[int | None, list[int]] = {}
        for i in members:
            policy = runs[i].policy
            observes_window = policy.observes & {"window_attention", "queries"}  # type: ignore[attr-defined]
            by_window.setdefault(policy.observation_window if observes_window else None, []).append(i)  # type: ignore[attr-defined]
        free = by_window.pop(None, [])  # (policies observing no window join the first window's batch)
        batches = [sorted(free + ws) if n == 0 else ws for n, ws in enumerate(by_window.values())] or [free]
        for batch in batches:
            for first in range(0, len(batch), GROUP_LIMIT):
                chunk = batch[first : first + GROUP_LIMIT]
                if len(chunk) > 1:
                    groups.append(chunk)
                else:
                    alone[chunk[0]] = "no other run to share a batch with"
    return groups, alone


def describe(runs: list[PlannedRun], groups: list[list[int]], alone: dict[int, str]) -> list[str]:
    """The plan's grouping in lines a user reads before the runs start."""
    lines = []
    for members in groups:
        names = ", ".join(runs[i].spec.display for i in members)
        lines.append(f"one batch of {len(members)} streams: {names} (the same tokens, each by its own policy)")
    for i, why in sorted(alone.items()):
        lines.append(f"alone: {runs[i].spec.display}: {why}")
    return lines
