"""Per-slot statistics a policy asked the engine for (accumulated attention, key norms): buffers
shaped like the keys without the last dimension, (L_s, B, H, capacity) float32 per shard, that
move with the keys at every eviction (they are among each shard's `buffers()`). Attention
statistics are written by the observer (observe.py); the ones in `ON_WRITE` are computed from the
keys as tokens enter (no attention capture, so the static and graph decode paths stay open)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from streambench.engine.cache.layers import Shard
    from streambench.engine.cache.quant import KVQuant


def _key_norm(keys: torch.Tensor) -> torch.Tensor:
    """L2 norm of each key (rotation keeps norms: the pre-RoPE key's is the cached key's)."""
    return keys.float().norm(dim=-1)


# statistic -> its value from the new tokens' keys (..., count, D) -> (..., count)
ON_WRITE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"key_norm": _key_norm}


class SlotStats:
    """The statistics half of `StreamCache` (a mixin over its shards and bookkeeping)."""

    # provided by StreamCache
    shards: list[Shard]
    num_layers: int
    kv_heads: int
    batch: int
    device: torch.device
    per_head: bool
    stat_names: tuple[str, ...]
    quant: KVQuant | None
    _n: int
    _slot: np.ndarray
    _where: list[tuple[Shard, int]]
    _base: np.ndarray
    _len: list[int]
    split: bool
    _dev: dict[str, torch.Tensor] | None

    if TYPE_CHECKING:

        def device_lanes(self, b: int) -> torch.Tensor: ...

        def _read(self, shard, layers, slots, b=None, rotate=True, part="kv"): ...

    def enable_stats(self, names) -> None:
        """Keep (L, B, H, capacity) float32 buffers `names` next to the keys; they move with them."""
        for shard in self.shards:
            for name in names:
                if name not in shard.stats:
                    shard.stats[name] = torch.zeros(
                        (shard.stop - shard.start, self.batch, self.kv_heads, shard.capacity),
                        dtype=torch.float32,
                        device=shard.device,
                    )
        self.stat_names = tuple(sorted(set(self.stat_names) | set(names)))

    def stat(self, layer: int, name: str) -> torch.Tensor:
        """Layer `layer`'s (B, H, capacity) buffer, indexed by physical slot."""
        shard, i = self._where[layer]
        return shard.stats[name][i]

    def _ranked(self, tensors, b: int) -> torch.Tensor:
        """Stream b's per-slot tensors (L_s, B, H, capacity, ...) per shard, in rank order: (L, H, n, ...)."""
        n, parts = self._n, []
        if self._dev is not None:  # (device-side bookkeeping: one shard, per-head rows; device_steps.py)
            return self._ranked_on_device(tensors[0], b)
        for shard, t in zip(self.shards, tensors):
            if self.per_head:
                lanes = self._slot.reshape(self.num_layers, self.batch, self.kv_heads, -1)[
                    shard.start : shard.stop, b, :, :n
                ]
                if self.split:  # a ragged layer's first pads hold no slot (-1): read slot 0, invalid anyway
                    lanes = np.maximum(lanes, 0)
                if t.is_contiguous():  # one index_select of whole rows: ~4x a gather's speed on CPU
                    lanes_total, cap = t.shape[0] * self.batch * self.kv_heads, t.shape[3]
                    first = (np.arange(lanes_total).reshape(t.shape[0], self.batch, self.kv_heads)[:, b] * cap)[
                        ..., None
                    ]
                    flat = shard.index((first + lanes).reshape(-1))
                    rows = t.reshape(lanes_total * cap, -1).index_select(0, flat)
                    parts.append(rows.reshape(*lanes.shape, *t.shape[4:]).to(self.device))
                    continue
                idx = shard.index(np.ascontiguousarray(lanes))
                if t.dim() == 5:
                    idx = idx[..., None].expand(-1, -1, -1, t.shape[-1])
                parts.append(torch.gather(t[:, b], 2, idx).to(self.device))
            else:
                parts.append(t[:, b].index_select(2, shard.index(self._slot[b, :n])).to(self.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _ranked_on_device(self, t: torch.Tensor, b: int) -> torch.Tensor:
        lanes = self.device_lanes(b)  # (L, H, n) slots
        L, B, H, cap = t.shape[:4]
        first = (torch.arange(L * B * H, device=t.device).view(L, B, H)[:, b] * cap)[..., None]
        rows = t.reshape(L * B * H * cap, -1).index_select(0, (first + lanes).reshape(-1))
        return rows.reshape(*lanes.shape, *t.shape[4:])

    def ranked_stat(self, name: str, b: int = 0) -> torch.Tensor:
        """Statistic `name` of stream b's kept tokens, (L, H, n) in each head's rank order."""
        return self._ranked([s.stats[name] for s in self.shards], b)

    def ranked_keys(self, b: int = 0) -> torch.Tensor:
        """Stream b's cached (rotated) keys, (L, H, n, D) in each head's rank order: a quantized
        cache's as attention reads them (dequantized, rotated at their positions)."""
        if self.quant is not None:
            return self._ranked_read(b, rotate=True, part="k")
        return self._ranked([s.k for s in self.shards], b)

    def ranked_values(self, b: int = 0) -> torch.Tensor:
        """Stream b's cached values, (L, H, n, D) in each head's rank order."""
        if self.quant is not None:
            return self._ranked_read(b, rotate=False, part="v")
        return self._ranked([s.v for s in self.shards], b)

    def ranked_pre_keys(self, b: int = 0) -> torch.Tensor:
        """Stream b's pre-RoPE keys, (L, H, n, D) in each head's rank order (a re-indexing cache)."""
        if self.quant is not None:
            return self._ranked_read(b, rotate=False, part="k")
        return self._ranked([s.pre() for s in self.shards], b)

    def _ranked_read(self, b: int, rotate: bool, part: str) -> torch.Tensor:
        """A quantized cache's keys or values of stream b as attention reads them, (L, H, n, D)
        in each head's rank order."""
        parts = []
        for shard in self.shards:
            layers = shard.stop - shard.start
            if self.per_head:
                lanes = self._slot.reshape(self.num_layers, self.batch, self.kv_heads, -1)[
                    shard.start : shard.stop, b, :, : self._n
                ]
                lanes = np.maximum(lanes, 0)  # (a ragged layer's slotless pads: read slot 0, masked anyway)
            else:
                lanes = np.broadcast_to(self._slot[b, : self._n], (layers, self.kv_heads, self._n))
            idx = shard.index(np.ascontiguousarray(lanes))
            parts.append(self._read(shard, slice(None), idx, b=b, rotate=rotate, part=part).to(self.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def save_stats(self):
        """The statistics of the kept tokens, for a rollback (a branch's queries add attention)."""
        return [{k: t[..., : self._len[s.start]].clone() for k, t in s.stats.items()} for s in self.shards]

    def restore_stats(self, saved) -> None:
        for shard, part in zip(self.shards, saved):
            for name, t in part.items():
                shard.stats[name][..., : t.shape[-1]] = t

    def _record_on_write(self, start: int, end: int) -> None:
        """The write-time statistics of the tokens just committed at slots [start, end)."""
        for shard in self.shards:
            at = slice(start - int(self._base[shard.start]), end - int(self._base[shard.start]))
            for name, value in ON_WRITE.items():
                if name in shard.stats:
                    if self.quant is not None:  # (what attention reads: the held keys, dequantized)
                        source = self._read(shard, slice(None), at, rotate=False, part="k")
                    else:
                        source = (shard.k_pre if shard.k_pre is not None else shard.k)[..., at, :]
                    shard.stats[name][..., at] = value(source)
