"""The size guard: what a run's cache (and memory bank) will need, checked against what the device
has before anything is allocated, so `--budget 1000000000` is one line in a moment, not a machine
swapping for minutes until the kernel kills it.

Bytes per cached token are exact for the engine's layout: keys and values for every layer and KV
head, plus the pre-RoPE key copy a re-indexing cache keeps (StreamCache). A stream never holds more
tokens than it feeds, so the estimate uses min(budget, tokens streamed) where the task knows its
length; the engine preallocates no more than that either.
"""

from __future__ import annotations

from dataclasses import dataclass

from streambench.errors import ConfigError

# Room left for activations, logits and the allocator's slack when judging what fits.
HEADROOM = 0.9


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Estimate:
    cache_tokens: int
    cache_bytes: int
    bank_tokens: int
    bank_bytes: int
    bank_device: str | None


def cache_tokens(policy, stream_tokens: int | None) -> int | None:
    """Most tokens the cache can hold in this run (None: unbounded and unknown)."""
    if not policy.evicts:
        return stream_tokens
    return policy.budget if stream_tokens is None else min(policy.budget, stream_tokens)


def estimate(policy, shape: Shape, itemsize: int, batch: int, stream_tokens: int | None) -> Estimate:
    per_token = shape.layers * shape.kv_heads * shape.head_dim * itemsize * batch
    tokens = cache_tokens(policy, stream_tokens) or 0
    copies = 2 if policy.recompute or not policy.evicts else 3  # K, V (+ pre-RoPE K when re-indexing)
    bank_tokens, bank_device = 0, None
    if policy.retrieves:
        limit = int(policy.args().get("bank_tokens") or 0)
        bank_tokens = limit if stream_tokens is None else min(limit, stream_tokens)
        bank_device = str(policy.args().get("bank_device", "cpu"))
    return Estimate(tokens, copies * per_token * tokens, bank_tokens, 2 * per_token * bank_tokens, bank_device)


def available_bytes(device) -> int | None:
    """Free memory on `device` now: RAM (psutil) for CPU, the CUDA driver's free bytes for a GPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**28 else f"{n / 2**20:,.1f} MiB"


def check_fits(
    name: str, policy, shape: Shape, itemsize: int, batch: int, stream_tokens: int | None, device
) -> Estimate:
    """Raise ConfigError, naming the bytes needed, when the cache or bank cannot fit."""
    est = estimate(policy, shape, itemsize, batch, stream_tokens)
    wanted = [(est.cache_bytes, str(device), f"a KV cache of {est.cache_tokens:,} tokens")]
    if est.bank_bytes:
        wanted.append((est.bank_bytes, est.bank_device, f"a memory bank of {est.bank_tokens:,} tokens"))
    by_device: dict[str, int] = {}
    for size, where, _ in wanted:
        by_device[where] = by_device.get(where, 0) + size
    for where, size in by_device.items():
        free = available_bytes(where)
        if free is not None and size > HEADROOM * free:
            what = " and ".join(w for s, d, w in wanted if d == where and s)
            raise ConfigError(
                f"{name}: {what} needs {_gib(size)} on {where}, but only {_gib(free)} is free; "
                "lower the budget (or bank_tokens)"
            )
    return est
