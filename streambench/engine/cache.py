"""StreamCache: a transformers `Cache` whose kept tokens can be evicted and re-indexed exactly.

Layout: one preallocated buffer per tensor for all layers, shape (L, B, H, capacity, D) (one per
device when a device map spreads the layers), so the engine's own work (eviction, re-rotation) is
a handful of batched ops per step, not L of them. B streams are fed in lockstep; each keeps its own
tokens, bookkeeping and rotation offset.
The valid tokens occupy physical slots [0, n) in *any* order: attention over a cache is
permutation-invariant, so eviction fills holes with tokens moved from the tail ("swap-remove"):
O(evicted) copies, never a shift of the whole cache. New tokens are always appended at the end,
so the ordinary causal mask is right for multi-token chunks too.

Positions follow mit-han-lab/streaming-llm: a kept token's position is its rank among the kept
tokens (time order), the query's is the number of kept tokens. RoPE depends only on position
differences, so the cache stores every key rotated at `rank + offset` for one `offset` per stream:
after an eviction, the largest group of tokens whose rank shifted by the same amount keeps its
rotation (the offset absorbs the shift) and only the others are re-rotated, from their pre-RoPE
keys. For StreamingLLM that is the 4 sink tokens per step. When the offset grows past the
capacity, all keys are re-rotated once at offset 0 (amortised O(1)), so positions stay as small
as a fresh forward's and never lose float precision.

Keep-sets may differ per layer and KV head (H2O, KNorm, SnapKV keep different tokens in every
head): the first such eviction switches the bookkeeping to one row per (layer, stream, head)
"lane", each with its own slot map, positions and scores, all lanes keeping equally many tokens so
the buffers stay rectangular. A token's position in a head is its rank among that head's kept
tokens; the query sits at the count kept, as before, so one offset per stream still serves every
head (the largest group of equal rank shifts over all of a stream's lanes keeps its rotation).

Per-slot statistics a policy asked the engine for (accumulated attention, key norms) live in
buffers shaped like the keys without the last dimension and move with them.

Hybrid models (Gemma 2/3, any `layer_types` mix) have sliding-window layers too: those keep
exactly what the model's own sliding cache keeps, the last `window - 1` stream tokens (`_Sliding`),
whatever the policy does; the policy governs the full-attention layers, whose count is
`num_layers` here (policies, statistics and keep-sets see only them). A sliding layer must see
its keys at their stream distances from the query, as in the model; the query is rotated at the
full layers' re-indexed position `n + offset`, so a sliding key of stream position s is kept
rotated at `s + shift` with `shift = n + offset - fed`, and re-rotated from its pre-RoPE copy in
the rare step where an eviction changes that shift (a renormalisation, a retrieval splice, a
keep-set whose commonest rank shift is not the recent tokens').

Host-side bookkeeping (numpy, per rank in time order): physical slot, original stream position
and per-token score. The engine is exact: the next-token logits equal a fresh forward over the
kept tokens at positions 0..n-1 (tests/engine/test_exactness.py).
"""

from __future__ import annotations

import copy
import weakref

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from streambench.models.rope import RotaryTable


class _StreamLayer(CacheLayerMixin):
    """A view of one layer of the shared buffers, for code that walks `cache.layers`.

    It holds its cache weakly: a cycle would keep a finished run's buffers (GPU memory) alive
    until the garbage collector happens to run.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: StreamCache, idx: int):  # no super().__init__: keys/values are properties
        self._ref = weakref.ref(owner)
        self._idx = idx
        self.is_initialized = True

    @property
    def _owner(self) -> StreamCache:
        return self._ref()

    @property
    def keys(self) -> torch.Tensor:
        shard, i = self._owner._where[self._idx]
        return shard.k[i, :, :, : self._owner._len[self._idx]]

    @property
    def values(self) -> torch.Tensor:
        shard, i = self._owner._where[self._idx]
        return shard.v[i, :, :, : self._owner._len[self._idx]]

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner._write(self._idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner._len[self._idx] + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner._len[self._idx]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._owner.reset()


class _SlidingLayer(_StreamLayer):
    """A sliding-window layer: the last `window - 1` stream tokens, in time order (the model's
    sliding mask is index based), with the model's own mask coordinates."""

    is_sliding = True

    @property
    def keys(self) -> torch.Tensor:
        slide = self._owner.sliding
        return slide.k[self._idx][:, :, slide.visible_start : slide.end]

    @property
    def values(self) -> torch.Tensor:
        slide = self._owner.sliding
        return slide.v[self._idx][:, :, slide.visible_start : slide.end]

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner.sliding.write(self._idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.sliding.visible + query_length, 0

    def get_seq_length(self) -> int:
        return self._owner.sliding.visible

    def get_max_length(self) -> int:
        return self._owner.sliding.window


class _Sliding:
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
        self.owner.evictions += 1  # the tokens before the window are gone: no rollback across this

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
            for k, k_pre in zip(self.k, self.k_pre):
                if self.owner.batch == 1:
                    k_pre[:, :, lo:hi] = self.rope.unrotate(
                        k[:, :, lo:hi], torch.from_numpy(at_all[0]).to(k.device), signed=True
                    )
                else:
                    at = torch.from_numpy(at_all).to(k.device)
                    k_pre[:, :, lo:hi] = self.rope.unrotate(k[None, :, :, lo:hi], at, signed=True)[0]
        self.end += count

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


class _Shard:
    """The buffers of consecutive layers that live on one device, (L_s, B, H, capacity, D) each.
    One shard on a single device; a model spread over GPUs (--device-map) has one per device."""

    def __init__(self, device: torch.device, start: int, stop: int):
        self.device, self.start, self.stop = device, start, stop
        self.k = self.v = self.k_pre = None
        self.stats: dict[str, torch.Tensor] = {}  # (L_s, B, H, capacity) float32, per slot

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.k, self.v, self.k_pre, *self.stats.values()) if t is not None)

    def index(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)


class StreamCache(Cache):
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
        where = {i: n for n, i in enumerate(full)} | {i: n for n, i in enumerate(slides)}
        super().__init__(
            layers=[
                (_SlidingLayer if kinds[i] == "sliding_attention" else _StreamLayer)(self, where[i])
                for i in range(len(kinds))
            ]
        )
        self.model_layers = len(kinds)
        self.num_layers, self.kv_heads, self.head_dim = len(full), kv_heads, head_dim
        self.batch, self.dtype, self.device = batch_size, dtype, torch.device(device)
        self.rope = rope  # None: this cache never re-indexes (dense), so no pre-RoPE copy is kept
        self.capacity = 0
        all_devices = [torch.device(d) for d in (layer_devices or [self.device] * len(kinds))]
        devices = [all_devices[i] for i in full]
        self.sliding = None
        if slides:
            self.sliding = _Sliding(
                self,
                [all_devices[i] for i in slides],
                sliding_window,
                (sliding_rope or rope) if rope is not None else None,
            )
        self.shards: list[_Shard] = []
        for i, d in enumerate(devices):
            if not self.shards or self.shards[-1].device != d:
                self.shards.append(_Shard(d, i, i))
            self.shards[-1].stop = i + 1
        self._where = [(shard, i - shard.start) for shard in self.shards for i in range(shard.start, shard.stop)]
        self.static = False  # set by graphs.StaticDecoder: write at a device-held slot, return whole buffers
        self.stat_names: tuple[str, ...] = ()
        self._grow(max(int(capacity), 1))
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self._len = [0] * self.num_layers  # per layer, as layers run one after another in a forward
        self.evictions = 0  # bumped by every eviction (a rollback must not cross one)
        self._uniform = True  # every stream's slots and offsets alike (no per-stream eviction yet)
        self.per_head = False  # one bookkeeping row per stream; True: one per (layer, stream, head)
        self._row_stream = np.arange(self.batch)  # the stream of each bookkeeping row
        self._n = 0  # kept tokens; the per-token arrays below are valid up to here
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
            for buf in shard.stats.values():
                buf.zero_()

    def clone(self) -> StreamCache:
        """An independent copy (buffers and bookkeeping copied, the rotary table shared), for
        `StreamSession.fork`: a branch that may evict without touching the stream's own cache."""
        shared = [t for t in (self.rope, self.sliding.rope if self.sliding is not None else None) if t is not None]
        twin = copy.deepcopy(self, {id(t): t for t in shared})
        twin.layers = [type(layer)(twin, layer._idx) for layer in self.layers]  # (their weakrefs point here)
        if twin.sliding is not None:
            twin.sliding.owner = twin
        return twin

    def __len__(self) -> int:  # number of layers, as transformers' Cache
        return self.num_layers

    @property
    def length(self) -> int:
        """Kept tokens per stream (batched streams always keep equally many)."""
        return self._n

    # One stream's arrays (views, time order): (n,), or (L, H, n) once keep-sets differ per head.
    # `positions`/`scores`/`slots` are stream 0's, for the common single-stream case.
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

    def rescale_scores(self, fn) -> None:
        if self.per_head:
            self._score[:, : self._n] = fn(self._score[:, : self._n])
            return
        for b in range(self.batch):
            self._score[b, : self._n] = fn(self._score[b, : self._n])

    @property
    def offset(self) -> int:
        return int(self._offsets[0])

    def next_positions(self, count: int) -> torch.Tensor:
        """RoPE positions (B, count) for the next tokens: they sit right after the kept ones."""
        if self.sliding is not None:
            self.sliding.prepare(count, self._n + self._offsets, self._fed)
        if self.batch == 1:
            start = self._n + int(self._offsets[0])
            return torch.arange(start, start + count, device=self.device)[None]
        starts = self._n + self._offsets
        return torch.from_numpy(starts[:, None] + np.arange(count)).to(self.device)

    @property
    def k(self) -> torch.Tensor:  # single-device buffers, for tests and tools that inspect them
        return self._single_shard().k

    @property
    def v(self) -> torch.Tensor:
        return self._single_shard().v

    @property
    def k_pre(self) -> torch.Tensor:
        return self._single_shard().k_pre

    def _single_shard(self) -> _Shard:
        if len(self.shards) != 1:
            raise RuntimeError("this cache spans several devices: use cache.shards")
        return self.shards[0]

    def _grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        for shard in self.shards:
            shape = (shard.stop - shard.start, self.batch, self.kv_heads, capacity, self.head_dim)
            for name in ("k", "v", "k_pre"):
                if name == "k_pre" and self.rope is None:
                    continue
                old = getattr(shard, name)
                new = torch.zeros(shape, dtype=self.dtype, device=shard.device)
                if old is not None:
                    new[..., : self.capacity, :] = old
                setattr(shard, name, new)
            for name, old in shard.stats.items():
                new = torch.zeros(shape[:-1], dtype=old.dtype, device=shard.device)
                new[..., : self.capacity] = old
                shard.stats[name] = new
        self.capacity = capacity

    # ---- called by the model, once per layer per forward -----------------------------------
    def set_write_slot(self, slot: int) -> None:
        """Where the next static-shape forward writes its token (a device tensor, read by the graph)."""
        for shard in self.shards:
            if getattr(shard, "slot", None) is None:
                shard.slot = torch.zeros(1, dtype=torch.long, device=shard.device)
            shard.slot.fill_(slot)

    def mark_written(self, count: int) -> None:
        """A static-shape forward (which leaves no trace in Python) appended `count` tokens."""
        self._len = [self._n + count] * self.num_layers

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.static:
            shard, i = self._where[layer]
            shard.k[i].index_copy_(2, shard.slot, k)
            shard.v[i].index_copy_(2, shard.slot, v)
            return shard.k[i], shard.v[i]
        start = self._len[layer]
        end = start + k.shape[-2]
        if end > self.capacity:
            self._grow(end)
        shard, i = self._where[layer]
        shard.k[i, :, :, start:end].copy_(k)
        shard.v[i, :, :, start:end].copy_(v)
        self._len[layer] = end
        return shard.k[i, :, :, :end], shard.v[i, :, :, :end]

    # ---- called by the session ---------------------------------------------------------------
    def commit(self, positions: np.ndarray, scores: np.ndarray | None = None) -> None:
        """Record the tokens the last forward appended: their stream positions (count,) and
        scores (B, count) or None."""
        start, count = self._n, len(positions)
        end = start + count
        if any(n != end for n in self._len):
            raise RuntimeError("cache and bookkeeping disagree: was the forward run with this cache?")
        if end > self._slot.shape[1]:
            self._grow_meta(end)
        self._slot[:, start:end] = np.arange(start, end)
        self._pos[:, start:end] = positions
        if scores is None:
            self._score[:, start:end] = 0.0
        else:
            self._score[:, start:end] = scores if not self.per_head else scores[self._row_stream]
        self._n = end
        self._fed = int(positions[-1]) + 1 if count else self._fed
        if self.sliding is not None:
            self.sliding.commit(count)
        if self.rope is not None:  # keep the pre-RoPE key of each new token for later re-rotation
            self.rope.ensure(end + int(self._offsets.max()))
            if self.batch == 1:
                idx = np.arange(start + self.offset, end + self.offset)
            else:
                idx = (self._n - count + self._offsets)[:, None] + np.arange(count)  # (B, count): rank + offset
            for shard in self.shards:
                shard.k_pre[..., start:end, :] = self.rope.unrotate(shard.k[..., start:end, :], shard.index(idx))
        for shard in self.shards:
            if "key_norm" in shard.stats:  # rotation keeps norms: the pre-RoPE key's is the cached key's
                source = shard.k_pre if shard.k_pre is not None else shard.k
                shard.stats["key_norm"][..., start:end] = source[..., start:end, :].float().norm(dim=-1)

    def _grow_meta(self, size: int) -> None:
        size = max(size, 2 * self._slot.shape[1])
        for name in ("_slot", "_pos", "_score"):
            old = getattr(self, name)
            new = np.zeros((old.shape[0], size), dtype=old.dtype)
            new[:, : self._n] = old[:, : self._n]
            setattr(self, name, new)

    def evict(self, keep: np.ndarray) -> None:
        """Keep the tokens at ranks `keep` (sorted, time order) and re-index them to 0..n_new-1.
        `keep` is (n_new,) for every stream alike (a position-based policy: the streams' slots and
        offsets stay identical, so the work is done once for all), (B, n_new), one row each, or
        (B, L, H, n_new), one keep-set per stream, layer and KV head (ranks within that head)."""
        keep = np.asarray(keep)
        if keep.ndim == 4 or self.per_head:
            self._evict_per_head(keep)
            return
        shared = keep.ndim == 1 and self._uniform
        if keep.ndim == 1 and not shared:
            keep = np.broadcast_to(keep, (self.batch, len(keep)))
        rows = keep[None] if shared else keep
        if self.batch > 1 and not shared:
            self._uniform = False
        n_old, n_new = self._n, rows.shape[1]
        if n_new == n_old:
            return
        self.evictions += 1
        if self.rope is None:
            raise RuntimeError("this cache was built without re-indexing support (a dense policy)")
        moves, stale = [], []
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
            if offsets[0] > self.capacity:  # renormalise: every key back to offset 0
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
        if stale:
            self._rerotate(stale)

    # ---- keep-sets per layer and KV head ------------------------------------------------------
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
        self.per_head = True
        self._uniform = False

    def _evict_per_head(self, keep: np.ndarray) -> None:
        """Every lane keeps its own ranks; all vectorised over lanes (no Python loop per head)."""
        L, B, H = self.num_layers, self.batch, self.kv_heads
        if self.rope is None:
            raise RuntimeError("this cache was built without re-indexing support (a dense policy)")
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
        R = rows.shape[0]
        kept_slots = np.take_along_axis(self._slot[:, :n_old], rows, 1)
        kept_mask = np.zeros((R, n_old), dtype=bool)
        np.put_along_axis(kept_mask, rows, True, 1)
        freed = self._slot[:, :n_old][~kept_mask].reshape(R, n_old - n_new)
        # Per lane, kept tokens beyond the new valid region are as many as the holes inside it;
        # nonzero() walks row by row, so movers and holes pair up lane by lane.
        hole_r, hole_c = np.nonzero(freed < n_new)
        move_r, move_c = np.nonzero(kept_slots >= n_new)
        src, dst = kept_slots[move_r, move_c], freed[hole_r, hole_c]
        kept_slots[move_r, move_c] = dst
        shift = rows - np.arange(n_new)
        common = np.zeros(B, dtype=np.int64)
        if n_new:
            for b in range(B):  # one offset per stream: the commonest shift over all its lanes
                common[b] = np.bincount(shift[self._row_stream == b].ravel()).argmax()
        self._offsets += common
        renorm = self._offsets > self.capacity
        self._offsets[renorm] = 0
        stale = shift != common[self._row_stream][:, None]
        stale[renorm[self._row_stream]] = True
        self._pos[:, :n_new] = np.take_along_axis(self._pos[:, :n_old], rows, 1)
        self._score[:, :n_new] = np.take_along_axis(self._score[:, :n_old], rows, 1)
        self._slot[:, :n_new] = kept_slots
        self._n = n_new
        self._len = [n_new] * self.num_layers
        if len(src):
            self._move_lanes(move_r, src, dst)
        stale_r, stale_c = np.nonzero(stale)
        if len(stale_r):
            self.rope.ensure(self._n + int(self._offsets.max()) + 1)
            slots = self._slot[stale_r, stale_c]
            positions = stale_c + self._offsets[self._row_stream[stale_r]]
            for shard, local, flat in self._lane_index(stale_r, slots):
                pre = shard.k_pre.view(-1, self.head_dim).index_select(0, flat)
                shard.k.view(-1, self.head_dim).index_copy_(
                    0, flat, self.rope.rotate(pre, shard.index(positions[local]))
                )

    def _lane_index(self, rows: np.ndarray, slots: np.ndarray):
        """Per shard: (shard, which entries fall in it, flat index into its (L_s*B*H*capacity) slots)."""
        per_layer = self.batch * self.kv_heads
        for shard in self.shards:
            local = np.flatnonzero((rows >= shard.start * per_layer) & (rows < shard.stop * per_layer))
            if len(self.shards) == 1:
                local = slice(None)
            flat = (rows[local] - shard.start * per_layer) * self.capacity + slots[local]
            yield shard, local, shard.index(flat)

    def _move_lanes(self, rows: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        per_layer = self.batch * self.kv_heads
        for shard in self.shards:
            local = np.flatnonzero((rows >= shard.start * per_layer) & (rows < shard.stop * per_layer))
            base = (rows[local] - shard.start * per_layer) * self.capacity
            s, d = shard.index(base + src[local]), shard.index(base + dst[local])
            for buf in shard.buffers():
                flat = buf.view(-1, buf.shape[-1]) if buf.dim() == 5 else buf.view(-1)
                flat.index_copy_(0, d, flat.index_select(0, s))

    # ---- per-slot statistics a policy asked for -----------------------------------------------
    def enable_stats(self, names) -> None:
        """Keep (L, B, H, capacity) float32 buffers `names` next to the keys; they move with them."""
        for shard in self.shards:
            for name in names:
                if name not in shard.stats:
                    shard.stats[name] = torch.zeros(
                        (shard.stop - shard.start, self.batch, self.kv_heads, self.capacity),
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
        for shard, t in zip(self.shards, tensors):
            if self.per_head:
                idx = self._slot.reshape(self.num_layers, self.batch, self.kv_heads, -1)[
                    shard.start : shard.stop, b, :, :n
                ]
                idx = shard.index(np.ascontiguousarray(idx))
                if t.dim() == 5:
                    idx = idx[..., None].expand(-1, -1, -1, t.shape[-1])
                parts.append(torch.gather(t[:, b], 2, idx).to(self.device))
            else:
                parts.append(t[:, b].index_select(2, shard.index(self._slot[b, :n])).to(self.device))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def ranked_stat(self, name: str, b: int = 0) -> torch.Tensor:
        """Statistic `name` of stream b's kept tokens, (L, H, n) in each head's rank order."""
        return self._ranked([s.stats[name] for s in self.shards], b)

    def ranked_keys(self, b: int = 0) -> torch.Tensor:
        """Stream b's cached (rotated) keys, (L, H, n, D) in each head's rank order."""
        return self._ranked([s.k for s in self.shards], b)

    def save_stats(self):
        """The statistics of the kept tokens, for a rollback (a branch's queries add attention)."""
        return [{k: t[..., : self._n].clone() for k, t in s.stats.items()} for s in self.shards]

    def restore_stats(self, saved) -> None:
        for shard, part in zip(self.shards, saved):
            for name, t in part.items():
                shard.stats[name][..., : t.shape[-1]] = t

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

    def _single(self, what: str) -> None:
        if self.batch != 1:
            raise NotImplementedError(f"{what} works on single streams (batch size 1)")
        if self.per_head:
            raise NotImplementedError(f"{what} works on one keep-set for all heads")

    def take(self, ranks: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(positions, pre-RoPE keys, values) of the tokens at `ranks`; tensors (L, B, H, T, D)."""
        self._single("take")
        slots = self._slot[0, ranks]
        parts = [
            (
                s.k_pre.index_select(3, s.index(slots)).to(self.device),
                s.v.index_select(3, s.index(slots)).to(self.device),
            )
            for s in self.shards
        ]
        if len(parts) == 1:
            return self._pos[0, ranks].copy(), *parts[0]
        return self._pos[0, ranks].copy(), torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def splice(self, keep: np.ndarray, at: int, positions: np.ndarray, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the ranks `keep`, then insert tokens (pre-RoPE keys and values, (L, B, H, m, D)) so
        that they take ranks at..at+m-1: how retrieved memory joins the cache between the sinks and
        the recent window. The side of the insertion point with fewer tokens is re-rotated."""
        self._single("splice")
        self.evict(keep)
        m, n = len(positions), self._n
        if m == 0:
            return
        self.evictions += 1  # ranks move: no rollback across a splice either
        if n + m > self.capacity:
            self._grow(n + m)
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
        self.rope.ensure(n + m + offset)
        for shard in self.shards:
            part_k = k_pre[shard.start : shard.stop].to(shard.device, self.dtype)
            shard.k_pre[..., n : n + m, :] = part_k
            shard.v[..., n : n + m, :] = v[shard.start : shard.stop].to(shard.device, self.dtype)
            shard.k[..., n : n + m, :] = self.rope.rotate(part_k, shard.index(new_positions))
        if len(stale):
            self._rerotate([(0, stale)])

    def truncate(self, n: int) -> None:
        """Forget the tokens appended after the first `n` (valid only if nothing was evicted since:
        appended tokens occupy the slots and bookkeeping entries after them)."""
        dropped = self._n - n
        self._fed -= dropped
        if self.sliding is not None:
            self.sliding.truncate(dropped)
        self._n = n
        self._len = [n] * self.num_layers

    def _rerotate(self, stale: list) -> None:
        """Rotate keys afresh from their pre-RoPE copies: `stale` holds (stream or None for all, ranks) pairs."""
        self.rope.ensure(self._n + int(self._offsets.max()) + 1)
        if self._for_all_rows(stale):
            ((_, ranks),) = stale
            slots, positions = self._slot[0, ranks], ranks + self._offsets[0]
            for shard in self.shards:
                s = shard.index(slots)
                shard.k.index_copy_(3, s, self.rope.rotate(shard.k_pre.index_select(3, s), shard.index(positions)))
            return
        rows = np.concatenate([np.full(len(r), b) for b, r in stale])
        slots = np.concatenate([self._slot[b, r] for b, r in stale])
        positions = np.concatenate([r + self._offsets[b] for b, r in stale])
        for shard in self.shards:
            r, s = shard.index(rows), shard.index(slots)
            pre = shard.k_pre[:, r, :, s].permute(1, 2, 0, 3)  # (L, H, M, D)
            shard.k[:, r, :, s] = self.rope.rotate(pre, shard.index(positions)).permute(2, 0, 1, 3)

    # ---- accounting --------------------------------------------------------------------------
    def token_bytes(self) -> int:
        """Bytes of K and V per cached token, over all layers and the batch."""
        return 2 * self.num_layers * self.batch * self.kv_heads * self.head_dim * self.shards[0].k.element_size()

    def kv_bytes(self) -> int:
        """Exact bytes of the keys and values attention sees now (full and sliding layers)."""
        return self.length * self.token_bytes() + self.sliding_bytes()

    def sliding_bytes(self) -> int:
        return self.sliding.visible * self.sliding.token_bytes() if self.sliding is not None else 0

    def allocated_bytes(self) -> int:
        """Bytes held by the buffers (capacity, and the pre-RoPE key copy when re-indexing)."""
        n = sum(t.numel() * t.element_size() for s in self.shards for t in s.buffers())
        return n + (self.sliding.allocated_bytes() if self.sliding is not None else 0)
