"""`streambench bench`: speed as ratios measured in one process (never absolute numbers in tests).

- bound: bare matrix-vector products over every linear weight of the model (what one decode step
  must read at least), as tokens/s;
- plain: transformers' own decode with a DynamicCache, prefilled to `length` tokens;
- each policy's single-stream decode at the same cache length, over the bound and over plain;
- streamingllm's per-token speedup over recompute-window at several budgets (StreamingLLM reports
  up to 22.2x at 4K on an A6000; the ratio must grow with the budget).

Each measurement has a burn-in stage and a measured stage, with a synchronize around each on CUDA.
"""
from __future__ import annotations

import time

import torch

from streambench.config import PolicySpec, build_policy


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, n: int, burn: int, device) -> float:
    """Seconds per call of `step(i)` over n calls, after `burn` untimed ones."""
    for i in range(burn):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(burn, burn + n):
        step(i)
    _sync(device)
    return (time.perf_counter() - start) / n


@torch.no_grad()
def weight_bound(model, steps: int, burn: int) -> float:
    """Seconds for one pass of mat-vec products over all linear weights (the decode floor)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    device = weights[0].device
    vectors = {w.shape[1]: torch.randn(w.shape[1], dtype=w.dtype, device=device) for w in weights}
    return _timed(lambda i: [torch.mv(w, vectors[w.shape[1]]) for w in weights], steps, burn, device)


@torch.no_grad()
def plain_decode(lm, ids: torch.Tensor, length: int, steps: int, burn: int) -> float:
    from transformers import DynamicCache

    model = lm.model
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :length], cache=cache)
    return _timed(lambda i: model(input_ids=ids[:, length + i : length + i + 1], cache=cache), steps, burn, ids.device)


@torch.no_grad()
def policy_decode(lm, name: str, budget: int, ids: torch.Tensor, length: int, steps: int, burn: int) -> float:
    from streambench.session import StreamSession

    session = StreamSession(lm, build_policy(PolicySpec(name), budget))
    if session.policy.recompute:  # its state is just the token window; feeding it would be O(n^2)
        session._window = ids[:, :length]
    else:
        session.feed(ids[:, :length])
    return _timed(lambda i: session.feed(ids[:, length + i : length + i + 1]), steps, burn, ids.device)


def run_bench(lm, policies: list[str], budget: int, budgets: list[int], steps: int, burn: int) -> dict:
    device = next(lm.model.parameters()).device
    need = max([budget, *budgets]) + steps + burn + 2
    top = min(lm.model.config.vocab_size, 30000)
    ids = torch.randint(100, top, (1, need), generator=torch.Generator().manual_seed(0)).to(device)
    bound = weight_bound(lm.model, steps, burn)
    plain = plain_decode(lm, ids, budget - 1, steps, burn)
    rows = {}
    for name in policies:
        t = policy_decode(lm, name, budget, ids, budget - 1, steps, burn)
        rows[name] = {"ms_per_token": 1e3 * t, "tokens_per_s": 1 / t, "of_bound": bound / t, "over_plain": plain / t}
    dense = rows.get("dense", {}).get("ms_per_token")
    for row in rows.values():
        row["over_dense_time"] = row["ms_per_token"] / dense if dense else None
    speedups = {}
    for b in budgets:
        sinks = policy_decode(lm, "streamingllm", b, ids, b - 1, steps, burn)
        recompute = policy_decode(lm, "recompute-window", b, ids, b - 1, max(2, steps // 8), 1)
        speedups[b] = {"streamingllm_ms": 1e3 * sinks, "recompute_ms": 1e3 * recompute, "speedup": recompute / sinks}
    return {"device": str(device), "budget": budget, "steps": steps,
            "bound": {"ms_per_token": 1e3 * bound, "tokens_per_s": 1 / bound},
            "plain": {"ms_per_token": 1e3 * plain, "tokens_per_s": 1 / plain, "of_bound": bound / plain},
            "policies": rows, "streamingllm_vs_recompute": speedups}
