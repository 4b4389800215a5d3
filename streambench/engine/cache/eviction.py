"""Keep-sets applied to the cache: the kept tokens move into the holes (swap-remove), re-indexed
to ranks 0..n-1, and the keys whose rank shift differs from their stream's commonest one are
re-rotated from their pre-RoPE copies.

Keep-sets may differ per layer and KV head (H2O, KNorm, SnapKV keep different tokens in every
head): the first such eviction switches the bookkeeping to one row per (layer, stream, head)
"lane", each with its own slot map, positions and scores, all lanes keeping equally many tokens so
the buffers stay rectangular. A token's position in a head is its rank among that head's kept
tokens; the query sits at the count kept, as before, so one offset per stream still serves every
head (the largest group of equal rank shifts over all of a stream's lanes keeps its rotation).

Lanes may keep unequal counts (PyramidKV's per-layer budgets, AdaKV's heads sharing a layer's
pool, DuoAttention's streaming heads): a keep *mask* evicts each lane to its own count c. Ranks
stay rectangular, n = the largest count: a lane keeping c tokens holds them at ranks n - c .. n - 1
and n - c pads before them (position -1, masked out of attention: `allowed`). Its keys sit at
rank + offset as every lane's, so the query at n + offset sees its j-th kept token at distance
c - j: exactly a lane re-indexed to 0..c-1 on its own, with one query position. Slots do not:
each layer gets its own buffers (`_fit_layers`), holding m = its longest lane's count in slots
0..m-1; a lane's first n - m pads hold no slot at all (slot -1), the rest of its pads the slots
its kept tokens leave free. New tokens go after the layer's m slots, and the layer reads the
model's mask from the end (its old keys are all visible). So PyramidKV's upper layers allocate
what they keep, and only heads ragged within a layer pad (to that layer's longest).

Retrieval policies (longmem) take tokens out (`take`) and splice memory back in (`splice`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from streambench.engine.cache.quant import quantize

if TYPE_CHECKING:
    from streambench.engine.cache.layers import Shard
    from streambench.engine.cache.quant import KVQuant
    from streambench.models.rope import RotaryTable


class Eviction:
    """The eviction half of `StreamCache` (a mixin over its buffers and bookkeeping)."""

    # provided by StreamCache
    shards: list[Shard]
    rope: RotaryTable | None
    num_layers: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: torch.dtype
    device: torch.device
    evictions: int
    epoch: int
    per_head: bool
    uniform: bool
    frozen: bool
    _fed: int
    _n: int
    _len: list[int]
    _slot: np.ndarray
    _pos: np.ndarray
    _score: np.ndarray
    _offsets: np.ndarray
    _row_stream: np.ndarray
    _pads: np.ndarray | None
    _base: np.ndarray
    ragged: bool
    split: bool
    quant: KVQuant | None

    if TYPE_CHECKING:  # (StreamCache's own methods, which these parts call)

        def grow(self, capacity: int) -> None: ...

        def _grow_meta(self, size: int) -> None: ...

        def _read(self, shard, layers, slots, b=None, rotate=True, part="kv"): ...

        def _fit_layers(self, held: np.ndarray) -> None: ...

        @property
        def capacity(self) -> int: ...

        @property
        def renorm_limit(self) -> int: ...

        @property
        def offset(self) -> int: ...

    def evict(self, keep: np.ndarray, reindex: bool = True) -> None:
        """Keep the tokens at ranks `keep` (sorted, time order) and re-index them to 0..n_new-1.
        `keep` is (n_new,) for every stream alike (a position-based policy: the streams' slots and
        offsets stay identical, so the work is done once for all), (B, n_new), one row each, or
        (B, L, H, n_new), one keep-set per stream, layer and KV head (ranks within that head).

        reindex=False (kvpress's compress-once): the kept keys keep the rotation they were fed
        with and the next token continues at the stream's own position, as after a kvpress
        prefill compression; the cache is then frozen (its keys no longer sit at rank + offset),
        and a later eviction is refused."""
        if self.frozen:
            raise RuntimeError("this cache was compressed keeping original positions: it evicts no more")
        keep = np.asarray(keep)
        if keep.dtype == bool:
            self._evict_mask(keep, reindex)
            return
        if keep.ndim == 4 or self.per_head:
            self._evict_per_head(keep, reindex)
            return
        shared = keep.ndim == 1 and self.uniform
        if keep.ndim == 1 and not shared:
            keep = np.broadcast_to(keep, (self.batch, len(keep)))
        rows = keep[None] if shared else keep
        if self.batch > 1 and not shared:
            self.uniform = False
        n_old, n_new = self._n, rows.shape[1]
        if n_new == n_old:
            return
        self.evictions += 1
        self.epoch += 1
        self.reindexing()  # (a cache built for dense never evicts)
        moves: list = []
        stale: list = []
        for b, kb in enumerate(rows):
            stream = None if shared else b  # None: the same for every stream
            kept_mask = np.zeros(n_old, dtype=bool)
            kept_mask[kb] = True
            kept_slots = self._slot[b, kb]
            freed = self._slot[b, :n_old][~kept_mask]
            holes = freed[freed < n_new]  # free slots inside the new valid region ...
            movers = np.flatnonzero(kept_slots >= n_new)  # ... filled by kept tokens beyond it
            if len(movers):
                moves.append((stream, kept_slots[movers], holes))
                kept_slots[movers] = holes
            # Each kept token's rank dropped by the number of evicted tokens before it. The biggest
            # group of equal shifts keeps its rotation; the stream's offset absorbs that shift.
            shift = kb - np.arange(n_new)
            common = int(np.bincount(shift).argmax()) if n_new else 0  # budget 1: nothing kept
            offsets = self._offsets if shared else self._offsets[b : b + 1]
            offsets += common
            if offsets[0] > self.renorm_limit:  # renormalise: every key back to offset 0
                offsets[:] = 0
                stale.append((stream, np.arange(n_new)))
            else:
                changed = np.flatnonzero(shift != common)
                if len(changed):
                    stale.append((stream, changed))
            target = slice(None) if shared else b
            self._pos[target, :n_new] = self._pos[target, kb]
            self._score[target, :n_new] = self._score[target, kb]
            self._slot[target, :n_new] = kept_slots
        if moves:
            self._move(moves)
        self._n = n_new
        self._len = [n_new] * self.num_layers
        if not reindex:
            self._freeze(n_new)
        elif stale:
            self._rerotate(stale)

    def _freeze(self, n_new: int) -> None:
        """Keys stay where they were rotated; the next token goes on at the stream's position."""
        self._offsets[:] = self._fed - n_new
        self.frozen = True

    def _enter_per_head(self) -> None:
        """From one bookkeeping row per stream to one per (layer, stream, head): every lane starts
        as a copy of its stream's row. Rows are ordered as the buffers flatten, (L, B, H)."""
        L, B, H = self.num_layers, self.batch, self.kv_heads
        for name in ("_slot", "_pos", "_score"):
            old = getattr(self, name)
            # (a copy: with one lane the broadcast is already contiguous, and would stay a read-only view)
            setattr(
                self, name, np.broadcast_to(old[None, :, None], (L, B, H, old.shape[1])).reshape(L * B * H, -1).copy()
            )
        self._row_stream = np.tile(np.repeat(np.arange(B), H), L)
        self._pads = np.zeros(L * B * H, dtype=np.int64)
        self.per_head = True
        self.uniform = False

    def _evict_per_head(self, keep: np.ndarray, reindex: bool = True) -> None:
        """Every lane keeps its own ranks; all vectorised over lanes (no Python loop per head)."""
        L, B, H = self.num_layers, self.batch, self.kv_heads
        rope = self.reindexing()
        if not self.per_head:
            self._enter_per_head()
        if keep.ndim == 4:
            rows = keep.transpose(1, 0, 2, 3).reshape(L * B * H, -1)
        elif keep.ndim == 2:
            rows = keep[self._row_stream]
        else:
            rows = np.broadcast_to(keep, (L * B * H, len(keep)))
        n_old, n_new = self._n, rows.shape[1]
        if n_new == n_old:
            return
        self.evictions += 1
        self.epoch += 1
        R = rows.shape[0]
        kept_slots = np.take_along_axis(self._slot[:, :n_old], rows, 1)
        kept_mask = np.zeros((R, n_old), dtype=bool)
        np.put_along_axis(kept_mask, rows, True, 1)
        freed = self._slot[:, :n_old][~kept_mask].reshape(R, n_old - n_new)
        # Per lane, kept tokens beyond the new valid region are as many as the holes inside it;
        # nonzero() walks row by row, so movers and holes pair up lane by lane.
        hole_r, hole_c = np.nonzero((freed >= 0) & (freed < n_new))  # (-1: a ragged layer's slotless pads)
        move_r, move_c = np.nonzero(kept_slots >= n_new)
        src, dst = kept_slots[move_r, move_c], freed[hole_r, hole_c]
        kept_slots[move_r, move_c] = dst
        shift = rows - np.arange(n_new)
        common = self._commonest(shift.ravel(), np.repeat(self._row_stream, n_new))
        self._offsets += common
        renorm = self._offsets > self.renorm_limit
        self._offsets[renorm] = 0
        stale = shift != common[self._row_stream][:, None]
        stale[renorm[self._row_stream]] = True
        self._pos[:, :n_new] = np.take_along_axis(self._pos[:, :n_old], rows, 1)
        self._score[:, :n_new] = np.take_along_axis(self._score[:, :n_old], rows, 1)
        self._slot[:, :n_new] = kept_slots
        self._n = n_new
        self._len = [n_new] * self.num_layers
        self._base[:] = 0
        if self.ragged:  # (pads are never kept: every lane now holds n_new tokens)
            self._set_pads(np.zeros_like(self._pads))
        if len(src):
            self._move_lanes(move_r, src, dst)
        if not reindex:
            self._freeze(n_new)
            return
        self._rerotate_lanes(rope, *np.nonzero(stale))

    def _commonest(self, shift: np.ndarray, stream: np.ndarray) -> np.ndarray:
        """Per stream, the commonest rank shift of its kept tokens (ties: the smallest), which
        keeps its rotation (one offset per stream); 0 for a stream that keeps nothing."""
        common = np.zeros(self.batch, dtype=np.int64)
        for b in range(self.batch):
            mine = shift[stream == b]
            if len(mine):
                low = mine.min()
                common[b] = np.bincount(mine - low).argmax() + low
        return common

    def _evict_mask(self, mask: np.ndarray, reindex: bool = True) -> None:
        """Keep, per lane, the ranks where `mask` (B, L, H, n) is True: counts may differ. Equal
        counts take the rectangular path (`_evict_per_head`), so a policy that happens to keep
        alike gives the numbers it always gave."""
        L, B, H = self.num_layers, self.batch, self.kv_heads
        if not self.per_head:
            self._enter_per_head()
        rows = np.ascontiguousarray(mask.transpose(1, 0, 2, 3)).reshape(L * B * H, -1)
        counts = rows.sum(axis=1)
        lane_r, lane_c = np.nonzero(rows)  # kept (lane, old rank), lane by lane, time order
        if (counts == counts[0]).all():
            ranks = lane_c.reshape(L, B, H, int(counts[0])).transpose(1, 0, 2, 3)
            self._evict_per_head(ranks, reindex)
            return
        rope = self.reindexing()
        R, n_new = len(rows), int(counts.max())
        self.evictions += 1
        self.epoch += 1
        pads = n_new - counts
        starts = np.cumsum(counts) - counts
        new_rank = pads[lane_r] + np.arange(len(lane_r)) - starts[lane_r]
        kept_slots = self._slot[lane_r, lane_c]
        if (kept_slots < 0).any():
            raise RuntimeError("a keep mask kept a pad")  # (the contract refuses it first)
        # Each layer holds slots [0, held) for its longest lane; a lane's first `base` ranks are
        # pads with no slot (-1), the rest of its pads take the slots its kept tokens leave free.
        held = counts.reshape(L, B * H).max(axis=1)
        base = n_new - held
        lane_held = np.repeat(held, B * H)
        # Slots inside the layer's region [0, held) that no kept token occupies: first the kept
        # tokens beyond it move in (lane by lane, in slot order), the rest hold the slotted pads.
        used = np.arange(n_new)[None, :] >= lane_held[:, None]
        inside = kept_slots < lane_held[lane_r]
        used[lane_r[inside], kept_slots[inside]] = True
        free_r, free_c = np.nonzero(~used)
        movers = np.flatnonzero(~inside)
        n_moves = np.bincount(lane_r[movers], minlength=R)
        n_free = lane_held - counts + n_moves
        free_start = np.cumsum(n_free) - n_free
        free_j = np.arange(len(free_r)) - free_start[free_r]
        to_mover = free_j < n_moves[free_r]
        src, dst = kept_slots[movers], free_c[to_mover]
        kept_slots[movers] = dst
        pad_r, pad_slot = free_r[~to_mover], free_c[~to_mover]
        pad_rank = free_j[~to_mover] - n_moves[pad_r] + (n_new - lane_held)[pad_r]
        # One offset per stream: the commonest rank shift over its kept tokens keeps its rotation.
        shift = lane_c - new_rank  # (a kept token may move up: pads now come before it)
        stream = self._row_stream[lane_r]
        common = self._commonest(shift, stream)
        self._offsets += common
        renorm = (self._offsets > self.renorm_limit) | (self._offsets < 0)
        self._offsets[renorm] = 0
        stale = (shift != common[stream]) | renorm[stream]
        slot, pos, score = (np.zeros((R, n_new), dtype=a.dtype) for a in (self._slot, self._pos, self._score))
        slot[lane_r, new_rank], pos[lane_r, new_rank] = kept_slots, self._pos[lane_r, lane_c]
        score[lane_r, new_rank] = self._score[lane_r, lane_c]
        slot[pad_r, pad_rank], pos[pad_r, pad_rank] = pad_slot, -1
        slotless = np.arange(n_new)[None, :] < (n_new - lane_held)[:, None]
        slot[slotless], pos[slotless] = -1, -1
        self._slot[:, :n_new], self._pos[:, :n_new], self._score[:, :n_new] = slot, pos, score
        self._n = n_new
        self._base = base
        self._len = [int(h) for h in held]
        if len(src):
            self._move_lanes(lane_r[movers], src, dst)
        self._fit_layers(held)
        self._set_pads(pads)
        if not reindex:
            self._freeze(n_new)
            return
        self._rerotate_lanes(rope, lane_r[stale], new_rank[stale])

    def _rerotate_lanes(self, rope: RotaryTable, rows: np.ndarray, ranks: np.ndarray) -> None:
        """Rotate the keys at (lane row, rank) afresh from their pre-RoPE copies, at rank + offset."""
        if not len(rows):
            return
        rope.ensure(self._n + int(self._offsets.max()) + 1)
        slots = self._slot[rows, ranks]
        positions = ranks + self._offsets[self._row_stream[rows]]
        for shard, local, flat in self._lane_index(rows, slots):
            if shard.kpos is not None:  # quantized: keys are rotated as attention reads them
                shard.kpos.view(-1).index_copy_(0, flat, shard.index(positions[local].astype(np.int32)))
                continue
            pre = shard.pre().view(-1, self.head_dim).index_select(0, flat)
            shard.k.view(-1, self.head_dim).index_copy_(0, flat, rope.rotate(pre, shard.index(positions[local])))

    def _set_pads(self, pads: np.ndarray) -> None:
        """Record each lane's pad count and mask its pad slots out of attention (`allowed`, per
        shard (L_s, B, H, capacity), True where a key may be attended; None: no pads anywhere)."""
        self._pads = pads
        self.ragged = bool(pads.any())
        if not self.ragged:
            for shard in self.shards:
                shard.allowed = None
            return
        pad_r, pad_c = np.nonzero(np.arange(self._n)[None, :] < pads[:, None])
        pad_slots = self._slot[pad_r, pad_c]
        slotted = pad_slots >= 0  # (a layer's first pads hold no slot)
        for shard, _, flat in self._lane_index(pad_r[slotted], pad_slots[slotted]):
            allowed = torch.ones(
                (shard.stop - shard.start, self.batch, self.kv_heads, shard.capacity),
                dtype=torch.bool,
                device=shard.device,
            )
            allowed.view(-1)[flat] = False
            shard.allowed = allowed

    def reindexing(self) -> RotaryTable:
        """The rotary table that re-indexing rotates with; a cache built without one (for dense,
        which never evicts) refuses."""
        if self.rope is None:
            raise RuntimeError("this cache was built without re-indexing support (a dense policy)")
        return self.rope

    def _lane_index(self, rows: np.ndarray, slots: np.ndarray):
        """Per shard: (shard, which entries fall in it, flat index into its (L_s*B*H*capacity) slots)."""
        per_layer = self.batch * self.kv_heads
        for shard in self.shards:
            local: np.ndarray | slice = np.flatnonzero(
                (rows >= shard.start * per_layer) & (rows < shard.stop * per_layer)
            )
            if len(self.shards) == 1:
                local = slice(None)
            flat = (rows[local] - shard.start * per_layer) * shard.capacity + slots[local]
            yield shard, local, shard.index(flat)

    def _move_lanes(self, rows: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        per_layer = self.batch * self.kv_heads
        for shard in self.shards:
            local = np.flatnonzero((rows >= shard.start * per_layer) & (rows < shard.stop * per_layer))
            base = (rows[local] - shard.start * per_layer) * shard.capacity
            s, d = shard.index(base + src[local]), shard.index(base + dst[local])
            for buf in shard.buffers():
                flat = buf.view(-1, buf.shape[-1]) if buf.dim() == 5 else buf.view(-1)
                flat.index_copy_(0, d, flat.index_select(0, s))

    def _for_all_rows(self, entries: list) -> bool:
        """One entry that applies to every stream alike: index the slot dimension of all rows."""
        return len(entries) == 1 and (entries[0][0] is None or self.batch == 1)

    def _move(self, moves: list) -> None:
        """Copy tokens between slots: `moves` holds (stream or None for all, source slots, destination slots)."""
        if self._for_all_rows(moves):
            ((_, src, dst),) = moves
            for shard in self.shards:
                s, d = shard.index(src), shard.index(dst)
                for buf in shard.buffers():
                    buf.index_copy_(3, d, buf.index_select(3, s))
            return
        rows = np.concatenate([np.full(len(s), b) for b, s, _ in moves])
        src = np.concatenate([s for _, s, _ in moves])
        dst = np.concatenate([d for _, _, d in moves])
        for shard in self.shards:
            r, s, d = shard.index(rows), shard.index(src), shard.index(dst)
            for buf in shard.buffers():
                buf[:, r, :, d] = buf[:, r, :, s]  # (M, L, H, D) gathered, then scattered

    def _rerotate(self, stale: list) -> None:
        """Rotate keys afresh from their pre-RoPE copies: `stale` holds (stream or None for all, ranks) pairs."""
        rope = self.reindexing()
        rope.ensure(self._n + int(self._offsets.max()) + 1)
        if self._for_all_rows(stale):
            ((_, ranks),) = stale
            slots, positions = self._slot[0, ranks], ranks + self._offsets[0]
            for shard in self.shards:
                s = shard.index(slots)
                if shard.kpos is not None:  # quantized: keys are rotated as attention reads them
                    at = shard.index(positions.astype(np.int32))
                    shard.kpos.index_copy_(3, s, at.expand(*shard.kpos.shape[:3], len(slots)))
                    continue
                shard.k.index_copy_(3, s, rope.rotate(shard.pre().index_select(3, s), shard.index(positions)))
            return
        rows = np.concatenate([np.full(len(r), b) for b, r in stale])
        slots = np.concatenate([self._slot[b, r] for b, r in stale])
        positions = np.concatenate([r + self._offsets[b] for b, r in stale])
        for shard in self.shards:
            r, s = shard.index(rows), shard.index(slots)
            if shard.kpos is not None:  # quantized: keys are rotated as attention reads them
                shard.kpos[:, r, :, s] = shard.index(positions.astype(np.int32))[:, None, None]
                continue
            pre = shard.pre()[:, r, :, s].permute(1, 2, 0, 3)  # (L, H, M, D)
            shard.k[:, r, :, s] = rope.rotate(pre, shard.index(positions)).permute(2, 0, 1, 3)

    def _single(self, what: str) -> None:
        if self.batch != 1:
            raise NotImplementedError(f"{what} works on single streams (batch size 1)")
        if self.per_head:
            raise NotImplementedError(f"{what} works on one keep-set for all heads")

    def take(self, ranks: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(positions, pre-RoPE keys, values) of the tokens at `ranks`; tensors (L, B, H, T, D)."""
        self._single("take")
        slots = self._slot[0, ranks]
        parts = [self._taken(s, s.index(slots)) for s in self.shards]
        if len(parts) == 1:
            return self._pos[0, ranks].copy(), *parts[0]
        return self._pos[0, ranks].copy(), torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _taken(self, shard: Shard, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-RoPE keys, values) at `slots` of every layer of `shard`, on the cache's device;
        a quantized cache's dequantized (what attention read)."""
        if self.quant is None:
            return shard.pre().index_select(3, slots).to(self.device), shard.v.index_select(3, slots).to(self.device)
        lanes = slots.expand(shard.stop - shard.start, self.kv_heads, len(slots))
        pre, values = self._read(shard, slice(None), lanes, b=0, rotate=False)
        return pre[:, None].to(self.device), values[:, None].to(self.device)

    def splice(self, keep: np.ndarray, at: int, positions: np.ndarray, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the ranks `keep`, then insert tokens (pre-RoPE keys and values, (L, B, H, m, D)) so
        that they take ranks at..at+m-1: how retrieved memory joins the cache between the sinks and
        the recent window. The side of the insertion point with fewer tokens is re-rotated."""
        self._single("splice")
        self.evict(keep)
        m, n = len(positions), self._n
        if m == 0:
            return
        self.epoch += 1  # ranks move: no rollback across a splice either
        if n + m > self.capacity:
            self.grow(n + m)
        if n + m > self._slot.shape[1]:
            self._grow_meta(n + m)
        offset = self.offset
        if at <= n - at and offset >= m:
            offset -= m  # the tokens after `at` keep their rotation; those before move
            stale = np.arange(at)
        elif at > n - at:
            stale = np.arange(at + m, n + m)  # the tokens after `at` move by m
        else:
            offset = 0  # no room to lower the offset: re-rotate everything once
            stale = np.concatenate([np.arange(at), np.arange(at + m, n + m)])
        self._offsets[0] = offset
        self._slot[0, : n + m] = np.insert(self._slot[0, :n], at, np.arange(n, n + m))
        self._pos[0, : n + m] = np.insert(self._pos[0, :n], at, positions)
        self._score[0, : n + m] = np.insert(self._score[0, :n], at, np.zeros(m))
        self._n = n + m
        self._len = [n + m] * self.num_layers
        new_positions = np.arange(at, at + m) + offset
        rope = self.reindexing()
        rope.ensure(n + m + offset)
        for shard in self.shards:
            part_k = k_pre[shard.start : shard.stop].to(shard.device, self.dtype)
            if self.quant is not None:  # (a bank's tokens held quantized again, as every token)
                part_v = v[shard.start : shard.stop].to(shard.device, self.dtype)
                for part, x in (("k", part_k), ("v", part_v)):
                    for suffix, t in zip("qsz", quantize(x, self.quant.bits, self.quant.group)):
                        getattr(shard, part + suffix)[..., n : n + m, :] = t
                kpos = shard.kpos
                assert kpos is not None
                kpos[..., n : n + m] = shard.index(new_positions.astype(np.int32))
                if shard.spos is not None:  # (their stream positions: behind the frontier, quantized)
                    shard.spos[..., n : n + m] = shard.index(positions.astype(np.int32))
                continue
            shard.pre()[..., n : n + m, :] = part_k
            shard.v[..., n : n + m, :] = v[shard.start : shard.stop].to(shard.device, self.dtype)
            shard.k[..., n : n + m, :] = rope.rotate(part_k, shard.index(new_positions))
        if len(stale):
            self._rerotate([(0, stale)])
