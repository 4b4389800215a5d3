"""What a policy promises the engine, checked where the engine relies on it, with one error
naming the policy (`PolicyContractError`, exit 2), never a corrupted cache or a silently wrong
number. A policy written outside this package gets the same checks as the built-in ones:

- its chunk limit (`max_incoming`), once per session;
- every `select()` output, at every eviction: integer ranks of shape (k,), (L, k) or
  (L, H_kv, k), each set sorted, unique, in range, leaving room for the incoming tokens, within
  the run's budget (the one the session was configured with, whatever the policy does to its own
  fields later); or, from a policy declaring `uneven`, a bool keep mask (L, n) or (L, H_kv, n)
  whose mean count over lanes leaves that room, keeping no pad, every lane within the (floor,
  cap) the policy declares for that eviction (`lane_limits`);
- a declared `Band` (exact chunked feeding relies on it without calling `select` inside a chunk):
  proven once on a probe before the first exact chunk, and held against the real keep-set at
  both ends of every chunk.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from streambench.errors import PolicyContractError
from streambench.policies.base import Band, CachePolicy, CacheView


def checked_max_incoming(policy: CachePolicy, budget: int | None) -> int | None:
    """The policy's chunk limit: an integer from 1 to the budget (None on an evicting policy:
    the budget, the most that can come in at once; None without a budget)."""
    limit = policy.max_incoming
    if limit is None:
        return budget
    if (
        isinstance(limit, bool)
        or not isinstance(limit, (int, np.integer))
        or limit < 1
        or (budget is not None and limit > budget)
    ):
        span = f"from 1 to the budget ({budget})" if budget is not None else ">= 1"
        raise PolicyContractError(
            f"policy {policy.name}: max_incoming must be None or an integer {span}, got {limit!r}"
        )
    return int(limit)


def checked_keep(
    policy: CachePolicy,
    keep,
    budget: int,
    incoming: int,
    length: int,
    layers: int,
    heads: int,
    valid: np.ndarray | None = None,
    limits: tuple[int | None, int | None] | None = None,
) -> np.ndarray:
    """`select()`'s output for a cache of `length` tokens before `incoming` more, as (k,) or
    (L, H_kv, k) int64 ranks (an (L, k) set is every head's of its layer), or an (L, H_kv, n) bool
    keep mask when lanes keep unequal counts. `valid` (L, H_kv, n): False at a ragged cache's pads."""
    if isinstance(keep, torch.Tensor):
        keep = keep.cpu().numpy()
    if isinstance(keep, np.ndarray) and keep.dtype == bool:
        return checked_mask(policy, keep, budget, incoming, length, layers, heads, valid, limits)
    try:
        keep = np.asarray(keep)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise PolicyContractError(
            f"policy {policy.name}: select() must return integer ranks of shape (k,), "
            f"(layers, k) or (layers, kv_heads, k): {exc}"
        ) from None
    target = budget - incoming
    problem = None
    if keep.ndim not in (1, 2, 3) or (keep.size and not np.issubdtype(keep.dtype, np.integer)):
        problem = (
            "must return integer ranks of shape (k,), (layers, k) or (layers, kv_heads, k), "
            f"got shape {keep.shape} of {keep.dtype}"
        )
    elif keep.ndim > 1 and keep.shape[:-1] != (layers, heads)[: keep.ndim - 1]:
        problem = f"returned shape {keep.shape}; this model has {layers} layers and {heads} KV heads"
    elif keep.size and (keep.min() < 0 or keep.max() >= length):
        problem = f"returned ranks outside [0, {length})"
    elif keep.shape[-1] > 1 and not (np.diff(keep, axis=-1) > 0).all():
        problem = "must return sorted, unique ranks (time order)"
    elif keep.shape[-1] > target:
        problem = f"kept {keep.shape[-1]} tokens, more than the {target} that leave room for {incoming} incoming"
    elif valid is not None and keep.size:
        lanes = keep if keep.ndim == 3 else keep[:, None] if keep.ndim == 2 else keep[None, None]
        lanes = np.broadcast_to(lanes, (layers, heads, keep.shape[-1]))
        if not np.take_along_axis(valid, lanes, -1).all():
            problem = "kept a pad (a rank where view.valid is False)"
    _raise(policy, problem, budget)
    if keep.ndim == 2:  # one set per layer: every head of the layer keeps it
        keep = np.broadcast_to(keep[:, None], (layers, heads, keep.shape[-1]))
    return keep.astype(np.int64, copy=False)


def _raise(policy: CachePolicy, problem: str | None, budget: int) -> None:
    if problem:
        if policy.budget != budget:
            problem += f" (it set its budget to {policy.budget}; the run's budget {budget} is the one enforced)"
        raise PolicyContractError(f"policy {policy.name}: select() {problem}")


def _outside_limits(keep: np.ndarray, limits, valid: np.ndarray | None, length: int) -> str | None:
    """Which lane breaks the policy's declared (floor, cap), if any."""
    floor, cap = limits if limits is not None else (None, None)
    counts = keep.sum(axis=-1)
    held = valid.sum(axis=-1) if valid is not None else np.full(counts.shape, length)
    if floor is not None:
        short = np.argwhere(counts < np.minimum(floor, held))
        if len(short):
            layer, head = short[0]
            return (
                f"kept {counts[layer, head]} tokens in layer {layer}, KV head {head}, below its declared floor {floor}"
            )
    if cap is not None:
        over = np.argwhere(counts > cap)
        if len(over):
            layer, head = over[0]
            return f"kept {counts[layer, head]} tokens in layer {layer}, KV head {head}, above its declared cap {cap}"
    return None


def checked_mask(
    policy: CachePolicy,
    keep: np.ndarray,
    budget: int,
    incoming: int,
    length: int,
    layers: int,
    heads: int,
    valid: np.ndarray | None,
    limits: tuple[int | None, int | None] | None = None,
) -> np.ndarray:
    """A keep mask: (L, n) or (L, H_kv, n) bool from a policy that declared `uneven`; the mean
    count over lanes within the target (the budget is keys per lane on average, so every policy
    at a budget holds the same total). Equal counts come back as (L, H_kv, k) ranks."""
    target = budget - incoming
    problem = None
    lanes = layers * heads
    if not policy.uneven:
        problem = "returned a keep mask (unequal counts per lane), which only a policy declaring `uneven` may"
    elif keep.ndim not in (2, 3) or keep.shape[:-1] != (layers, heads)[: keep.ndim - 1] or keep.shape[-1] != length:
        problem = (
            f"returned a keep mask of shape {keep.shape}; this cache needs (layers, {length}) or "
            f"(layers, kv_heads, {length}) with {layers} layers and {heads} KV heads"
        )
    else:
        keep = np.broadcast_to(keep[:, None], (layers, heads, length)) if keep.ndim == 2 else keep
        total = int(keep.sum())
        if total > target * lanes:
            problem = (
                f"kept {total / lanes:.2f} tokens per lane on average, more than the {target} that leave "
                f"room for {incoming} incoming"
            )
        elif valid is not None and (keep & ~valid).any():
            problem = "kept a pad (a rank where view.valid is False)"
        else:
            problem = _outside_limits(keep, limits, valid, length)
    _raise(policy, problem, budget)
    counts = keep.sum(axis=-1)
    if (counts == counts.flat[0]).all():  # (equal counts: the rectangular path)
        return np.nonzero(keep)[-1].reshape(layers, heads, int(counts.flat[0]))
    return np.ascontiguousarray(keep)


def check_band(policy: CachePolicy, band: Band, held: np.ndarray, fed: int, incoming: int) -> None:
    """The cache holds (`held`, stream positions) what the declared band says it holds once
    `fed` tokens are in and room is made for `incoming` more."""
    expected = band.kept(fed, incoming)
    if len(expected) != len(held) or not np.array_equal(np.sort(held), expected):
        raise PolicyContractError(
            f"policy {policy.name} declares {band} but kept other tokens {'before' if incoming else 'after'} position {fed}"
        )


def prove_band(policy: CachePolicy, band: Band, budget: int, max_tokens: int | None, layers: int, heads: int) -> None:
    """A declared band is a claim about `select`: proven on a copy of the policy by feeding a
    probe of positions token by token (one `select` per token past the budget) up to twice the
    budget, or the whole stream when it is shorter."""
    if band.budget != budget:
        raise PolicyContractError(f"policy {policy.name} declares {band} for a run of budget {budget}")
    probe = copy.deepcopy(policy)
    end = 2 * budget + 2 if max_tokens is None else min(2 * budget + 2, max_tokens + 1)
    held = np.empty(0, dtype=np.int64)
    for t in range(end):
        if len(held) + 1 > budget:
            view = CacheView(len(held), 1, budget, held, np.zeros(len(held), dtype=np.float32), {}, layers, heads)
            keep = checked_keep(probe, probe.select(view), budget, 1, len(held), layers, heads)
            if keep.ndim == 3:
                if not (keep == keep[:1, :1]).all():
                    raise PolicyContractError(
                        f"policy {policy.name} declares {band} but keeps other tokens in different heads"
                    )
                keep = keep[0, 0]
            held = held[keep]
            if not np.array_equal(held, band.kept(t, 1)):
                raise PolicyContractError(
                    f"policy {policy.name} declares {band} but its select() keeps other "
                    f"tokens before position {t} (a probe fed token by token)"
                )
        held = np.append(held, t)
