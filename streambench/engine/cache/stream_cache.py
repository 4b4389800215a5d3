"""StreamCache itself: the buffers' state, what the model writes (once per layer per forward), what
the session commits after each forward, one stream's views for policies, and the exact byte
accounting. Eviction, statistics and sliding layers are its other parts (see __init__.py)."""

from __future__ import annotations

import copy
from typing import Any, cast

import numpy as np
import torch
from transformers.cache_utils import Cache

from streambench.engine.cache.device_steps import DeviceSteps
from streambench.engine.cache.eviction import Eviction
from streambench.engine.cache.layers import Shard, SlidingLayer, StreamLayer
from streambench.engine.cache.quant import KVQuant
from streambench.engine.cache.quantized import SIDE_NAMES, Quantized
from streambench.engine.cache.sliding import SlidingWindows
from streambench.engine.cache.slot_stats import SlotStats
from streambench.models.rope import RotaryTable

_SLACK = 16  # slots a ragged cache's layer keeps beyond what it holds (tokens arriving between evictions)


class StreamCache(Eviction, SlotStats, Quantized, DeviceSteps, Cache):
    """Preallocated, evictable KV cache for B streams fed in lockstep: each stream keeps its own
    tokens (a score-based policy evicts different ones per stream), all keep equally many."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        capacity: int,
        rope: RotaryTable | None,
        batch_size: int = 1,
        layer_devices: list | None = None,
        layer_kinds: list[str] | None = None,
        sliding_window: int | None = None,
        sliding_rope: RotaryTable | None = None,
        quant: KVQuant | None = None,
    ):
        kinds = list(layer_kinds or ["full_attention"] * num_layers)
        self.layer_kinds = kinds
        full = [i for i, kind in enumerate(kinds) if kind != "sliding_attention"]
        slides = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
        if not full:
            raise ValueError("every layer slides: no layer for a cache policy to govern")
        # model layer -> index among its kind (full layers: into the shards' buffers)
        self.full_index = np.full(len(kinds), -1, dtype=np.int64)
        self.full_index[full] = np.arange(len(full))
        if slides and sliding_window is None:
            raise ValueError("sliding-window layers need the model's sliding_window")
        where = {i: n for n, i in enumerate(full)} | {i: n for n, i in enumerate(slides)}
        views: list[Any] = [  # (StreamLayer views; transformers' own layer union does not name them)
            (SlidingLayer if kinds[i] == "sliding_attention" else StreamLayer)(self, where[i])
            for i in range(len(kinds))
        ]
        super().__init__(layers=views)
        self.model_layers = len(kinds)
        self.num_layers, self.kv_heads, self.head_dim = len(full), kv_heads, head_dim
        self.batch, self.dtype, self.device = batch_size, dtype, torch.device(device)
        self.rope = rope  # None: this cache never re-indexes (dense), so no pre-RoPE copy is kept
        self._renorm_at: int | None = None  # (`fix_renorm`)
        # quantized (quant.py): codes, scales and zeros instead of k, v and k_pre; the full layers
        # only (sliding windows stay in the model's dtype)
        self.quant = quant if quant is not None and quant.quantized else None
        if self.quant is not None:
            self.quant.check(head_dim)
            if rope is None:
                raise ValueError("a quantized cache holds keys before RoPE: it needs the rotary table")
        self._wpos: tuple | None = None  # (rank, count, positions): where the forward's new keys were rotated
        all_devices = [torch.device(d) for d in (layer_devices or [self.device] * len(kinds))]
        devices = [all_devices[i] for i in full]
        self.sliding: SlidingWindows | None = None
        if slides:
            self.sliding = SlidingWindows(
                self,
                [all_devices[i] for i in slides],
                int(cast(int, sliding_window)),
                (sliding_rope or rope) if rope is not None else None,
            )
        self._devices = devices
        self.shards: list[Shard] = []
        self._where: list[tuple[Shard, int]] = []
        self._build_shards()
        self._base = np.zeros(self.num_layers, dtype=np.int64)  # per layer: ranks it holds no slot for
        self.static = False  # set by graphs.StaticDecoder: write at a device-held slot, return whole buffers
        # the streams a forward carries, when it carries only some (ragged.py: the others fed
        # nothing this time): their rows are written and read, the others' left as they are
        self.rows: torch.Tensor | None = None
        self.stat_names: tuple[str, ...] = ()
        self._dev: dict[str, torch.Tensor] | None = None  # the bookkeeping's device mirror (device_steps.py)
        self.grow(max(int(capacity), 1))
        self.reset()

    def _build_shards(self) -> None:
        """One shard per device (consecutive layers), buffers allocated by `grow`."""
        self.shards = []
        for i, d in enumerate(self._devices):
            if not self.shards or self.shards[-1].device != d:
                self.shards.append(Shard(d, i, i))
            self.shards[-1].stop = i + 1
        self._index_shards()
        self.split = False  # True: one shard per layer, each its own capacity (a ragged cache)

    def _index_shards(self) -> None:
        self._where = [(shard, i - shard.start) for shard in self.shards for i in range(shard.start, shard.stop)]

    @property
    def capacity(self) -> int:
        """Slots per lane (of the largest layer, once a ragged cache sized each layer apart)."""
        return max(shard.capacity for shard in self.shards)

    @property
    def renorm_limit(self) -> int:
        """The offset past which a stream's keys renormalise to offset 0: the capacity, or the one
        a group fixed (`fix_renorm`)."""
        return self._renorm_at if self._renorm_at is not None else self.capacity

    def fix_renorm(self) -> None:
        """Renormalise at today's capacity whatever the cache grows to: a group's pads grow it
        where each stream alone would not, and a stream renormalising at another offset than
        alone rotates its keys at other positions (float-close, not the same bits)."""
        self._renorm_at = self.capacity

    @property
    def spread(self) -> bool:
        """The layers live on several devices (--device-map)."""
        return len({shard.device for shard in self.shards}) > 1

    def reset(self) -> None:
        self._dev = None
        if self.split:  # back to one buffer per device, as a fresh cache
            capacity = self.capacity
            self._build_shards()
            self.grow(capacity)
            for name in self.stat_names:
                self.enable_stats([name])
        self._base = np.zeros(self.num_layers, dtype=np.int64)
        self._len = [0] * self.num_layers  # per layer, as layers run one after another in a forward
        self.evictions = 0  # evictions that removed tokens (what chat's status line counts)
        self.epoch = 0  # bumped by anything a rollback cannot undo: evictions, splices, sliding compaction
        self.uniform = True  # every stream's slots and offsets alike (no per-stream eviction yet)
        self.frozen = False  # compressed keeping original positions (kvpress's protocol): no more evictions
        self.per_head = False  # one bookkeeping row per stream; True: one per (layer, stream, head)
        self.ragged = False  # lanes keep unequal counts: pads masked out of attention (eviction.py)
        self._pads = None  # per lane, pad ranks before its kept tokens (per_head only)
        self._row_stream = np.arange(self.batch)  # the stream of each bookkeeping row
        self._n = 0  # kept tokens; the per-token arrays below are valid up to here
        self._wpos = None
        self._fed = 0  # stream position of the next token (sliding layers' distances)
        if self.sliding is not None:
            self.sliding.reset()
        self._offsets = np.zeros(self.batch, dtype=np.int64)  # per stream (batched streams evict apart)
        capacity = max(self.capacity, 1)
        # Per stream (rows), per kept token in time order (columns):
        self._slot = np.zeros((self.batch, capacity), dtype=np.int64)  # physical slot
        self._pos = np.zeros((self.batch, capacity), dtype=np.int64)  # original stream position
        self._score = np.zeros((self.batch, capacity), dtype=np.float64)  # score (e.g. surprisal)
        for shard in self.shards:
            shard.allowed = None
            for buf in shard.stats.values():
                buf.zero_()

    def clone(self) -> StreamCache:
        """An independent copy (buffers and bookkeeping copied, the rotary table shared), for
        `StreamSession.fork`: a branch that may evict without touching the stream's own cache."""
        shared = [t for t in (self.rope, self.sliding.rope if self.sliding is not None else None) if t is not None]
        twin = copy.deepcopy(self, {id(t): t for t in shared})
        twin.layers = [type(layer)(twin, layer._idx) for layer in self._views()]  # (their weakrefs point here)
        if twin.sliding is not None:
            twin.sliding.owner = twin
        return twin

    def _views(self) -> list[StreamLayer]:
        return cast(list[StreamLayer], self.layers)

    def __len__(self) -> int:  # number of layers, as transformers' Cache
        return self.num_layers

    @property
    def length(self) -> int:
        """Ranks per lane (batched streams always hold equally many): the kept tokens, and on a
        ragged cache the pads of lanes keeping fewer (see `lane_counts`)."""
        return self._n

    def lane_counts(self) -> np.ndarray:
        """Tokens each (layer, stream, KV head) lane keeps, (L, B, H)."""
        shape = (self.num_layers, self.batch, self.kv_heads)
        if not self.ragged:
            return np.full(shape, self._n, dtype=np.int64)
        return (self._n - cast(np.ndarray, self._pads)).reshape(shape)

    def lane_pads(self) -> np.ndarray:
        """Pad slots at the first ranks of each (layer, stream, KV head) lane, (L, B, H)."""
        return self._n - self.lane_counts()

    @property
    def mean_length(self) -> float:
        """Tokens kept per lane on average: what the budget bounds (equal to `length` unless ragged)."""
        if not self.ragged:
            return float(self._n)
        return self._n - float(cast(np.ndarray, self._pads).mean())

    def allowed_keys(self, layer: int, n: int) -> torch.Tensor | None:
        """(B, H, n) bool for full-attention layer `layer` (its index among full layers): False at
        pad slots. None while no lane has pads."""
        if not self.ragged:
            return None
        shard, i = self._where[layer]
        return cast(torch.Tensor, shard.allowed)[i, :, :, :n]

    def _of(self, array: np.ndarray, b: int) -> np.ndarray:
        if self.per_head:
            return array.reshape(self.num_layers, self.batch, self.kv_heads, -1)[:, b, :, : self._n]
        return array[b, : self._n]

    def positions_of(self, b: int) -> np.ndarray:
        return self._of(self._pos, b)

    def scores_of(self, b: int) -> np.ndarray:
        return self._of(self._score, b)

    @property
    def slots(self) -> np.ndarray:
        return self._of(self._slot, 0)

    @property
    def positions(self) -> np.ndarray:
        return self._of(self._pos, 0)

    @property
    def scores(self) -> np.ndarray:
        return self._of(self._score, 0)

    def rescale_scores(self, fn, stream: int | None = None) -> None:
        """Apply `fn` to the stored scores of every stream, or of `stream` alone (a group's
        streams each under their own policy)."""
        n = self._n
        if self.per_head:
            rows = slice(None) if stream is None else np.flatnonzero(self._row_stream == stream)
            self._score[rows, :n] = fn(self._score[rows, :n])
            return
        for b in range(self.batch) if stream is None else (stream,):
            self._score[b, :n] = fn(self._score[b, :n])

    @property
    def offset(self) -> int:
        return int(self._offsets[0])

    def offset_of(self, b: int) -> int:
        """Stream b's rotation offset: its keys are rotated at rank + offset."""
        return int(self._offsets[b])

    def next_positions(self, count: int) -> torch.Tensor:
        """RoPE positions (B, count) for the next tokens: they sit right after the kept ones."""
        if self.sliding is not None:
            self.sliding.prepare(count, self._n + self._offsets, self._fed)
        self._wpos = None
        if self.batch == 1:
            start = self._n + int(self._offsets[0])
            return torch.arange(start, start + count, device=self.device)[None]
        if self._dev is not None:  # (device-side steps: no host data copied up, device_steps.py)
            return self._n + self._dev["stream_offset"][:, None] + torch.arange(count, device=self.device)
        starts = self._n + self._offsets
        return torch.from_numpy(starts[:, None] + np.arange(count)).to(self.device)

    @property
    def k(self) -> torch.Tensor:  # single-device buffers, for tests and tools that inspect them
        shard = self._single_shard()
        return shard.k if self.quant is None else self._whole(shard)[0]

    @property
    def v(self) -> torch.Tensor:
        shard = self._single_shard()
        return shard.v if self.quant is None else self._whole(shard)[1]

    @property
    def k_pre(self) -> torch.Tensor | None:
        shard = self._single_shard()
        if self.quant is None:
            return shard.k_pre
        return self._read(shard, slice(None), slice(0, shard.capacity), rotate=False, part="k")

    def _whole(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        """A quantized shard's every slot, as attention would read it: (L_s, B, H, capacity, D)."""
        keys, values = self._read(shard, slice(None), slice(0, shard.capacity))
        return keys, values

    def _single_shard(self) -> Shard:
        if len(self.shards) != 1:
            raise RuntimeError("this cache spans several devices: use cache.shards")
        return self.shards[0]

    def grow(self, capacity: int) -> None:
        """Room for `capacity` tokens per stream (at least doubling; never shrinks)."""
        for shard in self.shards:
            if capacity > shard.capacity:
                self._resize(shard, max(capacity, 2 * shard.capacity))

    def set_capacity(self, capacity: int) -> None:
        """Exactly `capacity` slots per lane (at least the tokens held, which keep their slots):
        room for a tree of branches, then back (session.py `score_branches`)."""
        if self.split or capacity < self._n:
            raise RuntimeError("set_capacity: a cache of one shape per layer, holding at most `capacity` tokens")
        for shard in self.shards:
            if capacity != shard.capacity:
                self._resize(shard, capacity)

    def _resize(self, shard: Shard, capacity: int, keep: int | None = None) -> None:
        """New buffers of `capacity` slots per lane for `shard`, its first `keep` slots copied
        (all that fit by default)."""
        keep = min(shard.capacity if keep is None else keep, capacity)
        shape = (shard.stop - shard.start, self.batch, self.kv_heads, capacity, self.head_dim)
        for name, tail, dtype in self._held_tensors():
            old = getattr(shard, name)
            new = torch.zeros((*shape[:-1], *tail), dtype=dtype, device=shard.device)
            if old is not None:
                new[:, :, :, :keep] = old[:, :, :, :keep]
            setattr(shard, name, new)
        for name, old in shard.stats.items():
            new = torch.zeros(shape[:-1], dtype=old.dtype, device=shard.device)
            new[..., :keep] = old[..., :keep]
            shard.stats[name] = new
        if shard.allowed is not None:
            allowed = torch.ones(shape[:-1], dtype=torch.bool, device=shard.device)
            allowed[..., :keep] = shard.allowed[..., :keep]
            shard.allowed = allowed
        shard.capacity = capacity
        if self.quant is not None:
            self._ensure_side(shard)

    def _held_tensors(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape after the slot axis, dtype) of each tensor a shard holds per slot."""
        if self.quant is not None:
            return self._quantized_slots()
        names = ("k", "v", "k_pre") if self.rope is not None else ("k", "v")
        return [(name, (self.head_dim,), self.dtype) for name in names]

    def _fit_layers(self, held: np.ndarray) -> None:
        """Size each layer's buffers to the slots it holds, `held` (L,): a ragged cache's layers
        keep unequal counts (PyramidKV's schedule), and one capacity for all would allocate every
        layer at the longest one's length. The first call splits the shards into one per layer;
        a layer holding well under its capacity moves to smaller buffers (its held slots are its
        first ones, eviction.py), one growing past it to larger ones (`_write`)."""
        shards: list[Shard] = []
        for shard in self.shards:
            for i in range(shard.start, shard.stop):
                need = int(held[i])
                if self.split and shard.capacity <= need + need // 2 + _SLACK:
                    shards.append(shard)
                    continue
                one = Shard(shard.device, i, i + 1)
                local = slice(i - shard.start, i - shard.start + 1)
                for name, _, _ in self._held_tensors():
                    setattr(one, name, getattr(shard, name)[local])
                for name in SIDE_NAMES:  # (a quantized cache's block tables and rings, per layer)
                    side = getattr(shard, name)
                    setattr(one, name, side[local].clone() if side is not None else None)
                one.stats = {name: t[local] for name, t in shard.stats.items()}
                one.allowed = shard.allowed[local] if shard.allowed is not None else None
                one.capacity = shard.capacity
                self._resize(one, need + need // 4 + _SLACK, keep=need)  # (copies: frees the old buffers)
                shards.append(one)
        self.shards = shards
        self.split = True
        self._index_shards()

    def set_write_slot(self, slot: int) -> None:
        """Where the next static-shape forward writes its token (a device tensor, read by the graph)."""
        for shard in self.shards:
            if shard.slot is None:
                shard.slot = torch.zeros(1, dtype=torch.long, device=shard.device)
            shard.slot.fill_(slot)

    def mark_written(self, count: int) -> None:
        """A static-shape forward (which leaves no trace in Python) appended `count` tokens."""
        self._len = [self._n + count] * self.num_layers

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.quant is not None:
            return self._write_quantized(layer, k, v)
        if self.static:
            shard, i = self._where[layer]
            slot = cast(torch.Tensor, shard.slot)  # (set by set_write_slot before every static step)
            shard.k[i].index_copy_(2, slot, k)
            shard.v[i].index_copy_(2, slot, v)
            return shard.k[i], shard.v[i]
        start = self._len[layer]
        end = start + k.shape[-2]
        shard, i = self._where[layer]
        if end > shard.capacity:
            self._resize(shard, max(end, shard.capacity + shard.capacity // 4 if self.split else 2 * shard.capacity))
        self._len[layer] = end
        rows = self.rows
        if rows is not None:
            shard.k[i, :, :, start:end].index_copy_(0, rows, k)
            shard.v[i, :, :, start:end].index_copy_(0, rows, v)
            return shard.k[i, :, :, :end].index_select(0, rows), shard.v[i, :, :, :end].index_select(0, rows)
        shard.k[i, :, :, start:end].copy_(k)
        shard.v[i, :, :, start:end].copy_(v)
        return shard.k[i, :, :, :end], shard.v[i, :, :, :end]

    def commit(self, positions: np.ndarray, scores: np.ndarray | torch.Tensor | None = None) -> None:
        """Record the tokens the last forward appended: their stream positions (count,), or
        (B, count) where streams are ragged (a pad at -1, ragged.py), and scores (B, count) or None
        (a device tensor from a device-side step: device_steps.py)."""
        start, count = self._n, positions.shape[-1]
        end = start + count
        fed_before = self._fed
        base = self._base
        if self.split:  # (per token: the per-layer arithmetic only where layers hold apart)
            disagree = any(n != end - b for n, b in zip(self._len, base))
        else:
            disagree = any(n != end for n in self._len)
        if disagree:
            raise RuntimeError("cache and bookkeeping disagree: was the forward run with this cache?")
        if not (  # a device-side step keeps its bookkeeping there (device_steps.py)
            self._dev is not None
            and (scores is None or isinstance(scores, torch.Tensor))
            and positions.ndim == 1
            and (count == 0 or int(positions[-1]) - int(positions[0]) == count - 1)
            and self.commit_on_device(start, count, int(positions[0]) if count else 0, scores)
        ):
            if isinstance(scores, torch.Tensor):
                scores = scores.cpu().numpy()
            self._commit_host(start, end, positions, scores)
        self._n = end
        self._fed = int(positions[..., -1].max()) + 1 if count else self._fed
        if self.sliding is not None:
            self.sliding.commit(count)
        if self.quant is not None:  # (held before RoPE as they were written)
            self._wpos = None
            if self.quant.windowed:
                self._advance(fed_before)
        elif self.rope is not None:  # keep the pre-RoPE key of each new token for later re-rotation
            self.rope.ensure(end + int(self._offsets.max()))
            if self._dev is not None:  # (device-side steps: the rotation positions made there)
                rotated = self._dev["stream_offset"][:, None] + torch.arange(start, end, device=self.device)
            elif self.batch == 1:
                idx = np.arange(start + self.offset, end + self.offset)
            else:
                idx = (self._n - count + self._offsets)[:, None] + np.arange(count)  # (B, count): rank + offset
            for shard in self.shards:
                at = slice(start - int(base[shard.start]), end - int(base[shard.start]))
                where = rotated if self._dev is not None else shard.index(idx)
                shard.pre()[..., at, :] = self.rope.unrotate(shard.k[..., at, :], where)
        if self.stat_names:
            self._record_on_write(start, end)

    def _commit_host(self, start: int, end: int, positions: np.ndarray, scores: np.ndarray | None) -> None:
        count = end - start
        if end > self._slot.shape[1]:
            self._grow_meta(end)
        if self.split:  # each layer appends after the slots it holds
            first = (start - self._base)[np.arange(len(self._slot)) // (self.batch * self.kv_heads)]
            self._slot[:, start:end] = first[:, None] + np.arange(count)
        else:
            self._slot[:, start:end] = np.arange(start, end)
        self._pos[:, start:end] = positions if positions.ndim == 1 or not self.per_head else positions[self._row_stream]
        if scores is None:
            self._score[:, start:end] = 0.0
        else:
            self._score[:, start:end] = scores if not self.per_head else scores[self._row_stream]

    def _grow_meta(self, size: int) -> None:
        size = max(size, 2 * self._slot.shape[1])
        for name in ("_slot", "_pos", "_score"):
            old = getattr(self, name)
            new = np.zeros((old.shape[0], size), dtype=old.dtype)
            new[:, : self._n] = old[:, : self._n]
            setattr(self, name, new)

    def truncate(self, n: int) -> None:
        """Forget the tokens appended after the first `n` (valid only if nothing was evicted since:
        appended tokens occupy the slots and bookkeeping entries after them)."""
        dropped = self._n - n
        self._fed -= dropped
        if self.sliding is not None:
            self.sliding.truncate(dropped)
        self._n = n
        self._len = [n - int(b) for b in self._base]

    def lane_bytes(self) -> int:
        """Bytes of one token's key and value in one (layer, stream, head) lane: 2 x head_dim
        values, or quantized, their codes with a scale and a zero per group (quant.py). A
        quantized key's int32 rotation position is bookkeeping, like the slot map: not counted
        here, counted in `allocated_bytes`."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        if self.quant is None:
            return 2 * self.head_dim * itemsize
        return self.quant.lane_bytes(self.head_dim, itemsize)

    def token_bytes(self) -> int:
        """Bytes of K and V per cached token, over all layers and the batch."""
        return self.num_layers * self.batch * self.kv_heads * self.lane_bytes()

    def kv_bytes(self) -> int:
        """Exact bytes of the keys and values kept now (full and sliding layers): logical, the
        tokens each lane keeps summed over lanes (quantized: `quantized_kv_bytes`)."""
        if self.quant is not None:
            return self.quantized_kv_bytes() + self.sliding_bytes()
        return int(self.lane_counts().sum()) * self.lane_bytes() + self.sliding_bytes()

    def physical_kv_bytes(self) -> int:
        """Bytes of the keys and values attention reads now: every layer at the slots it holds,
        its lanes padded to its longest (a ragged cache's pads included), plus the sliding windows."""
        slots = self.num_layers * self.length - int(self._base.sum())
        if self.quant is not None:  # what the lanes hold, and a quantized token's bytes per pad slot
            pads = slots * self.batch * self.kv_heads - int(self.lane_counts().sum())
            return self.kv_bytes() + pads * self.lane_bytes()
        return slots * (self.token_bytes() // self.num_layers) + self.sliding_bytes()

    def sliding_bytes(self) -> int:
        return self.sliding.visible * self.sliding.token_bytes() if self.sliding is not None else 0

    def allocated_bytes(self) -> int:
        """Bytes held by the buffers (capacity, and the pre-RoPE key copy when re-indexing)."""
        n = sum(t.numel() * t.element_size() for s in self.shards for t in (*s.buffers(), *s.side()))
        return n + (self.sliding.allocated_bytes() if self.sliding is not None else 0)
