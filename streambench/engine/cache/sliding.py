"""Hybrid models (Gemma 2/3, any `layer_types` mix) have sliding-window layers too: those keep
exactly what the model's own sliding cache keeps (transformers' `DynamicSlidingWindowLayer`), the
last `window - 1` stream tokens, whatever the policy does; the policy governs the full-attention
layers, whose count is the cache's `num_layers` (policies, statistics and keep-sets see only them).
A sliding layer must see its keys at their stream distances from the query, as in the model; the
query is rotated at the full layers' re-indexed position `n + offset`, so a sliding key of stream
position s is kept rotated at `s + shift` with `shift = n + offset - fed`, and re-rotated from its
pre-RoPE copy in the rare step where an eviction changes that shift (a renormalisation, a
retrieval splice, a keep-set whose commonest rank shift is not the recent tokens')."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from streambench.models.rope import RotaryTable

if TYPE_CHECKING:
    from streambench.engine.cache.stream_cache import StreamCache


class SlidingWindows:
    """The sliding layers' keys and values: (B, H, capacity, D) per layer on its device, tokens in
    physical slots [start, end) in time order; the visible ones are the last window - 1. New tokens
    go at `end`; when room runs out the visible ones move to the front (once per ~window tokens).
    Tokens before the visible ones stay until then, so a rollback (dialogue branches) can return."""

    def __init__(self, owner: StreamCache, devices: list, window: int, rope: RotaryTable | None):
        self.owner, self.devices, self.window, self.rope = owner, devices, int(window), rope
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.k_pre: list[torch.Tensor] = []
        self._grow(2 * max(self.window - 1, 1) + 16)
        self.reset()

    def reset(self) -> None:
        self.start = self.end = 0
        self.first = 0  # stream position of slot `start`
        self.shift = np.zeros(self.owner.batch, dtype=np.int64)  # per stream: keys rotated at s + shift
        self._shift_dev: tuple[np.ndarray, torch.Tensor] | None = None  # (shift, its device copy)

    @property
    def visible_start(self) -> int:
        return max(self.start, self.end - (self.window - 1))

    @property
    def visible(self) -> int:
        return self.end - self.visible_start

    def _grow(self, capacity: int) -> None:
        owner = self.owner
        for i, device in enumerate(self.devices):
            shape = (owner.batch, owner.kv_heads, capacity, owner.head_dim)
            for name in ("k", "v", "k_pre"):
                if name == "k_pre" and self.rope is None:
                    continue
                bufs = getattr(self, name)
                new = torch.zeros(shape, dtype=owner.dtype, device=device)
                if i < len(bufs):
                    new[:, :, : self.capacity] = bufs[i]
                    bufs[i] = new
                else:
                    bufs.append(new)
        self.capacity = capacity

    def make_room(self, count: int) -> None:
        """Room for `count` more tokens without moving any (before a branch that rolls back)."""
        if self.end + count > self.capacity:
            self._compact(count)

    def _compact(self, count: int) -> None:
        """The visible tokens to the front (growing first if they and `count` would not fit)."""
        keep_from = self.visible_start
        kept = self.end - keep_from
        if kept + count > self.capacity // 2:
            self._grow(2 * (kept + count))
        for bufs in (self.k, self.v, self.k_pre):
            for buf in bufs:
                buf[:, :, :kept] = buf[:, :, keep_from : self.end].clone()
        self.first += keep_from - self.start
        self.start, self.end = 0, kept
        self.owner.epoch += 1  # the tokens before the window are gone: no rollback across this

    def prepare(self, count: int, query_start: np.ndarray, fed: int) -> None:
        """Before a forward of `count` tokens whose queries sit at `query_start` (B,): room at the
        end, and every visible key rotated at its stream distance from those queries."""
        if self.end + count > self.capacity:
            self._compact(count)
        shift = query_start - fed
        changed = np.flatnonzero(shift != self.shift)
        if len(changed):
            if self.rope is None:
                raise RuntimeError("sliding layers re-rotated in a cache built without re-indexing support")
            lo, hi = self.visible_start, self.end
            if hi > lo:
                positions = self.first + np.arange(lo - self.start, hi - self.start)
                self.rope.ensure(int(np.abs(positions[None] + shift[:, None]).max()) + count + 2)
                for k, k_pre in zip(self.k, self.k_pre):
                    for b in changed:
                        at = torch.from_numpy(positions + shift[b]).to(k.device)
                        k[b, :, lo:hi] = self.rope.rotate(k_pre[b, :, lo:hi], at, signed=True)
            self.shift = shift.copy()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.end + k.shape[-2]
        self.k[layer][:, :, self.end : end].copy_(k)
        self.v[layer][:, :, self.end : end].copy_(v)
        lo = self.visible_start
        return self.k[layer][:, :, lo:end], self.v[layer][:, :, lo:end]

    def commit(self, count: int) -> None:
        """The forward wrote `count` tokens at the end: keep their pre-RoPE keys, move the end."""
        if self.rope is not None:
            lo, hi = self.end, self.end + count
            positions = self.first + np.arange(lo - self.start, hi - self.start)
            at_all = positions[None] + self.shift[:, None]  # (B, count): where the model rotated them
            self.rope.ensure(int(np.abs(at_all).max()) + 2)
            # (positions made on the device once, not copied up: one run per stream, its shift apart)
            device = self.k[0].device
            if self.owner.batch == 1:
                first = int(at_all[0, 0])
                made = torch.arange(first, first + count, device=device)
            else:
                start = int(positions[0])
                made = self._shifts_on(device)[:, None] + torch.arange(start, start + count, device=device)
            for k, k_pre in zip(self.k, self.k_pre):
                at = made.to(k.device)
                if self.owner.batch == 1:
                    k_pre[:, :, lo:hi] = self.rope.unrotate(k[:, :, lo:hi], at, signed=True)
                else:
                    k_pre[:, :, lo:hi] = self.rope.unrotate(k[None, :, :, lo:hi], at, signed=True)[0]
        self.end += count

    def _shifts_on(self, device: torch.device) -> torch.Tensor:
        """The streams' shifts as a device tensor, copied up only when they change (rarely)."""
        cached = self._shift_dev
        if cached is None or cached[0] is not self.shift or cached[1].device != device:
            cached = self._shift_dev = (self.shift, torch.from_numpy(self.shift).to(device))
        return cached[1]

    def truncate(self, dropped: int) -> None:
        self.end -= dropped

    def token_bytes(self) -> int:
        """K and V bytes per visible token over the sliding layers and the batch."""
        return (
            2
            * len(self.devices)
            * self.owner.batch
            * self.owner.kv_heads
            * self.owner.head_dim
            * self.owner.dtype.itemsize
        )

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for bufs in (self.k, self.v, self.k_pre) for t in bufs)
