"""Evictions decided and applied on the device: the decode step of a content-aware policy with no
device-to-host copy (issue 29).

A scored policy (h2o, tova, knorm, snapkv; sirllm from logit surprisal) picks its keep-set from
device tensors (accumulated attention, key norms); the host bookkeeping (eviction.py: slot map, positions, scores in numpy)
needs that keep-set on the host, so every step waited for the device to finish before choosing
(the `.cpu()` of the keep-set). Here the bookkeeping moves to the device while the stream is in
its steady state, and moves back the first time anything reads it on the host:

- `_slot`, `_pos` and `_score` are descriptors over the host arrays that first copy the device
  mirror back if it is the current one (`_dev`): every host path of the cache (eviction.py,
  slot_stats.py, the views a host policy reads, checkpoints) stays as it was, and only pays one
  copy when it follows device steps.
- `evict_on_device(drop)` removes `drop` ranks per (layer, stream, head) lane (or per stream,
  for a policy keeping alike in all its lanes), all in fixed-shape
  tensor ops (a stable sort instead of a boolean gather, sorted pairs instead of `nonzero`): the
  kept tokens beyond the new valid region move into the holes (the swap-remove of eviction.py,
  paired in slot order), the slot map, positions and scores are gathered to their new ranks.
- Re-rotation: which keys change rotation depends on the dropped ranks, so it is data-dependent
  on the host path (the commonest shift keeps its rotation). Here every kept key is rotated afresh
  from its pre-RoPE copy at rank + offset, the offset grown by the count dropped (so the query's
  position advances with the stream, and a hybrid model's sliding keys keep theirs): one pass over
  the keys per eviction instead of a variable-length gather, the price of a step whose shapes
  never depend on the data (and so could be captured whole in a CUDA graph).

Exactness is the host path's: the kept keys sit at rank + offset, rotated from their pre-RoPE
copies (tests/engine/test_device_steps.py compares logits with the reference and the host path,
and counts host syncs with a dispatch-mode counter)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from streambench.engine.cache.layers import Shard
    from streambench.engine.cache.quant import KVQuant
    from streambench.engine.cache.sliding import SlidingWindows
    from streambench.models.rope import RotaryTable

_HOST = ("_slot_h", "_pos_h", "_score_h")


class _HostArray:
    """A host bookkeeping array (`_slot`, `_pos`, `_score`, stored as `<name>_h`) that copies the
    device mirror back before it is read or replaced."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.store = f"{name}_h"

    def __get__(self, cache: DeviceSteps | None, owner: type | None = None) -> Any:
        if cache is None:  # (read on the class)
            return self
        if cache._dev is not None:
            cache._to_host()
        return getattr(cache, self.store)

    def __set__(self, cache: DeviceSteps, value: np.ndarray) -> None:
        cache._to_host()
        setattr(cache, self.store, value)


class DeviceSteps:
    """The device half of `StreamCache`'s bookkeeping (a mixin over its buffers)."""

    # provided by StreamCache
    shards: list[Shard]
    rope: RotaryTable | None
    quant: KVQuant | None
    sliding: SlidingWindows | None
    num_layers: int
    kv_heads: int
    batch: int
    device: torch.device
    per_head: bool
    uniform: bool
    frozen: bool
    ragged: bool
    split: bool
    static: bool
    evictions: int
    epoch: int
    _n: int
    _len: list[int]
    _base: np.ndarray
    _offsets: np.ndarray
    _row_stream: np.ndarray
    _slot_h: np.ndarray
    _pos_h: np.ndarray
    _score_h: np.ndarray
    _dev: dict[str, torch.Tensor] | None

    if TYPE_CHECKING:

        def _enter_per_head(self) -> None: ...

        @property
        def capacity(self) -> int: ...

        @property
        def renorm_limit(self) -> int: ...

    # ---- the host arrays, brought back from the device when read ------------------------------
    _slot = _HostArray()
    _pos = _HostArray()
    _score = _HostArray()

    def _to_host(self) -> None:
        """The device mirror back into the host arrays (the one copy a host reader pays)."""
        dev = self._dev
        if dev is None:
            return
        self._dev = None
        for name in _HOST:
            width = dev[name].shape[1]
            getattr(self, name)[:, :width] = dev[name].cpu().numpy()

    # ---- the steady state on the device -------------------------------------------------------
    def device_refusal(self) -> str | None:
        """Why this cache cannot keep its bookkeeping on the device now (None: it can)."""
        if self.rope is None:
            return "it never re-indexes (dense)"
        if self.quant is not None:
            return "a quantized cache keeps host-side state per slot"
        if self.ragged or self.split or self.frozen:
            return "its lanes keep unequal counts, or it was compressed keeping positions"
        if len(self.shards) != 1:
            return "its layers are spread over devices"
        return None

    @property
    def on_device(self) -> bool:
        """The bookkeeping lives on the device now (the host arrays are stale)."""
        return self._dev is not None

    def to_device(self) -> dict[str, torch.Tensor]:
        """The bookkeeping's device mirror, made from the host arrays if they are the current ones."""
        if self._dev is None:
            # (copies: on a CPU `.to` would share the host arrays' memory, and the two sides
            # update their offsets apart)
            def up(array: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.array(array)).to(self.device)

            dev = {name: up(getattr(self, name)) for name in _HOST}
            dev["offset"] = up(self._offsets[self._row_stream])[:, None]
            dev["stream"] = up(self._row_stream)
            dev["stream_offset"] = up(self._offsets)  # (B,)
            self._dev = dev
        return self._dev

    def _lanes_of(self, name: str, b: int) -> torch.Tensor:
        """Stream b's row(s) of a device array: (L, H, n) per head, else (n,)."""
        rows = self.to_device()[name]
        if self.per_head:
            return rows.view(self.num_layers, self.batch, self.kv_heads, -1)[:, b, :, : self._n]
        return rows[b, : self._n]

    def device_positions(self, b: int) -> torch.Tensor:
        """Stream b's kept positions from the device mirror: (L, H, n) per head, else (n,)."""
        return self._lanes_of("_pos_h", b)

    def device_scores(self, b: int) -> torch.Tensor:
        return self._lanes_of("_score_h", b)

    def device_lanes(self, b: int) -> torch.Tensor:
        """Stream b's slot map (L, H, n) from the device mirror (slot_stats.py's ranked reads)."""
        lanes = self._lanes_of("_slot_h", b)
        return lanes if self.per_head else lanes.expand(self.num_layers, self.kv_heads, self._n)

    def commit_on_device(self, start: int, count: int, first_position: int, scores: torch.Tensor | None) -> bool:
        """Record `count` tokens appended at ranks and slots [start, start + count), stream
        positions from `first_position` on, `scores` (B, count) on the device or 0: commit's
        bookkeeping on the device mirror. False where the mirror is too narrow (the host path
        grows the arrays; rare)."""
        dev = self._dev
        end = start + count
        if dev is None or end > dev["_slot_h"].shape[1]:
            return False
        dev["_slot_h"][:, start:end] = torch.arange(start, end, device=self.device)
        dev["_pos_h"][:, start:end] = torch.arange(first_position, first_position + count, device=self.device)
        if scores is None:
            dev["_score_h"][:, start:end] = 0.0
        else:
            dev["_score_h"][:, start:end] = scores.index_select(0, dev["stream"]) if self.per_head else scores
        return True

    def evict_on_device(self, drop: torch.Tensor) -> None:
        """Drop the ranks `drop` (R, k), unique within a row, any order, and re-index what stays
        to ranks 0..n-k-1. One row per (layer, stream, head) lane, R = L x B x H in the buffers'
        order, or one per stream (R = B) applying to all its lanes (a per-stream policy, sirllm)."""
        rope = self.rope
        assert rope is not None
        L, B, H = self.num_layers, self.batch, self.kv_heads
        R, k = drop.shape
        lanes = R == L * B * H and R != B
        if lanes and not self.per_head:  # (one bookkeeping row per lane from now on)
            self._to_host()
            self._enter_per_head()
        dev = self.to_device()
        n_old = self._n
        n_new = n_old - k
        if k == 0:
            return
        self.evictions += 1
        self.epoch += 1
        device = self.device
        slot, pos, score = dev["_slot_h"], dev["_pos_h"], dev["_score_h"]
        gone = torch.zeros((R, n_old), dtype=torch.bool, device=device).scatter_(1, drop, True)
        # kept ranks in time order: a stable sort puts them first (no boolean gather: fixed shapes)
        kept = torch.sort(gone.to(torch.uint8), dim=1, stable=True).indices[:, :n_new]
        kept_slots = slot[:, :n_old].gather(1, kept)
        gone_slots = slot[:, :n_old].gather(1, drop)
        # Swap-remove: the kept tokens in slots [n_new, n_old) move into the dropped tokens' slots
        # below n_new, the i-th mover (in slot order) into the i-th hole (in slot order).
        holes = torch.where(gone_slots < n_new, gone_slots, n_old).sort(dim=1).values
        freed = torch.zeros((R, n_old), dtype=torch.bool, device=device).scatter_(1, gone_slots, True)
        movers = ~freed[:, n_new:]  # (R, k): region slot j holds a kept token
        which = (movers.cumsum(1) - 1).clamp(min=0)
        region = torch.arange(n_new, n_old, device=device)
        dest = torch.where(movers, holes.gather(1, which), region)  # (non-movers stay: a self-copy)
        new_slots = torch.where(kept_slots >= n_new, dest.gather(1, (kept_slots - n_new).clamp(min=0)), kept_slots)
        pos[:, :n_new] = pos[:, :n_old].gather(1, kept)
        score[:, :n_new] = score[:, :n_old].gather(1, kept)
        slot[:, :n_new] = new_slots
        rank_of_slot = torch.empty((R, n_new), dtype=torch.long, device=device)
        rank_of_slot.scatter_(1, new_slots, torch.arange(n_new, device=device).expand(R, n_new))
        if not lanes:  # (a stream's row, for every lane of it)
            dest = dest.view(1, B, 1, k).expand(L, B, H, k).reshape(L * B * H, k)
        for shard in self.shards:
            for buf in (shard.v, shard.pre(), *shard.stats.values()):
                flat = buf.view(L * B * H, shard.capacity, -1)
                moved = flat[:, n_new:n_old].clone()
                flat.scatter_(1, dest[..., None].expand(-1, -1, flat.shape[-1]), moved)
        self._n = n_new
        self._len = [n_new] * L
        self._base[:] = 0
        self.uniform = self.uniform and not lanes and B == 1
        # Every kept key afresh at rank + offset (which ones moved rank depends on the data). The
        # offset grows by the count dropped, as the host path's does for a stream dropping its
        # oldest: the query's position then advances with the stream, so sliding layers' keys
        # keep their rotation; past the capacity it starts again at 0, on both sides (host and
        # device apply the same rule, so neither reads the other).
        self._offsets += k
        renorm = self._offsets > self.renorm_limit
        self._offsets[renorm] = 0
        for name in ("offset", "stream_offset"):
            dev[name] += k
            dev[name].masked_fill_(dev[name] > self.renorm_limit, 0)
        positions = rank_of_slot + dev["offset"]
        if not lanes:
            positions = positions.view(1, B, 1, n_new).expand(L, B, H, n_new)
        rope.ensure(n_new + int(self._offsets.max()) + 1)
        positions = positions.reshape(L, B, H, n_new)
        for shard in self.shards:
            shard.k[..., :n_new, :] = rope.rotate_each(shard.pre()[..., :n_new, :], positions)
