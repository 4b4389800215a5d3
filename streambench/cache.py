"""StreamCache: a transformers `Cache` whose kept tokens can be evicted and re-indexed exactly.

Layout: one preallocated buffer per tensor for all layers, shape (L, B, H, capacity, D), so the
engine's own work (eviction, re-rotation) is a handful of batched ops per step, not L of them.
The valid tokens occupy physical slots [0, n) in *any* order: attention over a cache is
permutation-invariant, so eviction fills holes with tokens moved from the tail ("swap-remove"):
O(evicted) copies, never a shift of the whole cache. New tokens are always appended at the end,
so the ordinary causal mask is right for multi-token chunks too.

Positions follow mit-han-lab/streaming-llm: a kept token's position is its rank among the kept
tokens (time order), the query's is the number of kept tokens. RoPE depends only on position
differences, so the cache stores every key rotated at `rank + offset` for one shared `offset`:
after an eviction, the largest group of tokens whose rank shifted by the same amount keeps its
rotation (the offset absorbs the shift) and only the others are re-rotated, from their pre-RoPE
keys. For StreamingLLM that is the 4 sink tokens per step. When the offset grows past the
capacity, all keys are re-rotated once at offset 0 (amortised O(1)), so positions stay as small
as a fresh forward's and never lose float precision.

Host-side bookkeeping (numpy, per rank in time order): physical slot, original stream position
and per-token score. The engine is exact: the next-token logits equal a fresh forward over the
kept tokens at positions 0..n-1 (tests/test_exactness.py).
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from streambench.rope import RotaryTable


class _StreamLayer(CacheLayerMixin):
    """A view of one layer of the shared buffers, for code that walks `cache.layers`.

    It holds its cache weakly: a cycle would keep a finished run's buffers (GPU memory) alive
    until the garbage collector happens to run.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "StreamCache", idx: int):  # no super().__init__: keys/values are properties
        self._ref = weakref.ref(owner)
        self._idx = idx
        self.is_initialized = True

    @property
    def _owner(self) -> "StreamCache":
        return self._ref()

    @property
    def keys(self) -> torch.Tensor:
        return self._owner.k[self._idx, :, :, : self._owner._len[self._idx]]

    @property
    def values(self) -> torch.Tensor:
        return self._owner.v[self._idx, :, :, : self._owner._len[self._idx]]

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


class StreamCache(Cache):
    """Preallocated, evictable KV cache for one stream (batch dimension kept for batched streams)."""

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
    ):
        super().__init__(layers=[_StreamLayer(self, i) for i in range(num_layers)])
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.batch, self.dtype, self.device = batch_size, dtype, torch.device(device)
        self.rope = rope  # None: this cache never re-indexes (dense), so no pre-RoPE copy is kept
        self.capacity = 0
        self.k = self.v = self.k_pre = None
        self._grow(max(int(capacity), 1))
        self.reset()

    # ---- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self._len = [0] * self.num_layers  # per layer, as layers run one after another in a forward
        self.offset = 0  # keys are rotated at rank + offset
        self.evictions = 0  # bumped by every eviction (a rollback must not cross one)
        self._n = 0  # kept tokens; the per-token arrays below are valid up to here
        capacity = max(self.capacity, 1)
        self._slot = np.zeros(capacity, dtype=np.int64)  # physical slot of each kept token, time order
        self._pos = np.zeros(capacity, dtype=np.int64)  # original stream position, time order
        self._score = np.zeros(capacity, dtype=np.float64)  # per-token score (e.g. surprisal)

    def __len__(self) -> int:  # number of layers, as transformers' Cache
        return self.num_layers

    @property
    def length(self) -> int:
        return self._n

    @property
    def slots(self) -> np.ndarray:
        return self._slot[: self._n]

    @property
    def positions(self) -> np.ndarray:
        return self._pos[: self._n]

    @property
    def scores(self) -> np.ndarray:
        return self._score[: self._n]

    @scores.setter
    def scores(self, values: np.ndarray) -> None:
        self._score[: self._n] = values

    def next_positions(self, count: int) -> torch.Tensor:
        """RoPE positions for the next `count` tokens: they sit right after the kept ones."""
        start = self.length + self.offset
        return torch.arange(start, start + count, device=self.device)[None]

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = (self.num_layers, self.batch, self.kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        capacity = max(capacity, 2 * self.capacity)
        for name in ("k", "v", "k_pre"):
            if name == "k_pre" and self.rope is None:
                continue
            old = getattr(self, name)
            new = self._alloc(capacity)
            if old is not None:
                new[..., : self.capacity, :] = old
            setattr(self, name, new)
        self.capacity = capacity

    # ---- called by the model, once per layer per forward -----------------------------------
    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start = self._len[layer]
        end = start + k.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer, :, :, start:end].copy_(k)
        self.v[layer, :, :, start:end].copy_(v)
        self._len[layer] = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    # ---- called by the session ---------------------------------------------------------------
    def commit(self, positions: np.ndarray, scores: np.ndarray | None = None) -> None:
        """Record the tokens the last forward appended (their stream positions and scores)."""
        start, count = self._n, len(positions)
        end = start + count
        if any(n != end for n in self._len):
            raise RuntimeError("cache and bookkeeping disagree: was the forward run with this cache?")
        if end > len(self._slot):
            self._grow_meta(end)
        self._slot[start:end] = np.arange(start, end)
        self._pos[start:end] = positions
        self._score[start:end] = 0.0 if scores is None else scores
        self._n = end
        if self.rope is not None:  # keep the pre-RoPE key of each new token for later re-rotation
            idx = torch.arange(start, end, device=self.device)
            self.rope.ensure(end + self.offset)
            self.k_pre[..., start:end, :] = self.rope.unrotate(self.k[..., start:end, :], idx + self.offset)

    def _grow_meta(self, size: int) -> None:
        size = max(size, 2 * len(self._slot))
        for name in ("_slot", "_pos", "_score"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def evict(self, keep: np.ndarray) -> None:
        """Keep the tokens at ranks `keep` (sorted, time order); re-index them to 0..len(keep)-1."""
        n_old, n_new = self._n, len(keep)
        if n_new == n_old:
            return
        self.evictions += 1
        if self.rope is None:
            raise RuntimeError("this cache was built without re-indexing support (a dense policy)")
        kept_mask = np.zeros(n_old, dtype=bool)
        kept_mask[keep] = True
        kept_slots = self._slot[keep]
        freed = self._slot[:n_old][~kept_mask]
        holes = freed[freed < n_new]  # free slots inside the new valid region ...
        movers = np.flatnonzero(kept_slots >= n_new)  # ... filled by kept tokens beyond it
        if len(movers):
            src = torch.from_numpy(kept_slots[movers]).to(self.device)
            dst = torch.from_numpy(holes).to(self.device)
            for buf in (self.k, self.v, self.k_pre):
                buf.index_copy_(3, dst, buf.index_select(3, src))
            kept_slots[movers] = holes

        # Each kept token's rank dropped by the number of evicted tokens before it. The biggest
        # group of equal shifts keeps its rotation; the shared offset absorbs that shift.
        shift = keep - np.arange(n_new)
        common = int(np.bincount(shift).argmax())
        self.offset += common
        if self.offset > self.capacity:  # renormalise: every key back to offset 0
            self.offset = 0
            stale = np.arange(n_new)
        else:
            stale = np.flatnonzero(shift != common)
        self._pos[:n_new] = self._pos[keep]
        self._score[:n_new] = self._score[keep]
        self._slot[:n_new] = kept_slots
        self._n = n_new
        self._len = [n_new] * self.num_layers
        if len(stale):
            self._rerotate(stale)

    def take(self, ranks: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(positions, pre-RoPE keys, values) of the tokens at `ranks`; tensors (L, B, H, T, D)."""
        slots = torch.from_numpy(self._slot[ranks]).to(self.device)
        return self._pos[ranks].copy(), self.k_pre.index_select(3, slots), self.v.index_select(3, slots)

    def splice(self, keep: np.ndarray, at: int, positions: np.ndarray, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the ranks `keep`, then insert tokens (pre-RoPE keys and values, (L, B, H, m, D)) so
        that they take ranks at..at+m-1: how retrieved memory joins the cache between the sinks and
        the recent window. The side of the insertion point with fewer tokens is re-rotated."""
        self.evict(keep)
        m, n = len(positions), self._n
        if m == 0:
            return
        self.evictions += 1  # ranks move: no rollback across a splice either
        if n + m > self.capacity:
            self._grow(n + m)
        if n + m > len(self._slot):
            self._grow_meta(n + m)
        if at <= n - at and self.offset >= m:
            self.offset -= m  # the tokens after `at` keep their rotation; those before move
            stale = np.arange(at)
        elif at > n - at:
            stale = np.arange(at + m, n + m)  # the tokens after `at` move by m
        else:
            self.offset = 0  # no room to lower the offset: re-rotate everything once
            stale = np.concatenate([np.arange(at), np.arange(at + m, n + m)])
        self._slot[: n + m] = np.insert(self._slot[:n], at, np.arange(n, n + m))
        self._pos[: n + m] = np.insert(self._pos[:n], at, positions)
        self._score[: n + m] = np.insert(self._score[:n], at, np.zeros(m))
        self._n = n + m
        self._len = [n + m] * self.num_layers
        new_positions = torch.arange(at, at + m, device=self.device) + self.offset
        self.rope.ensure(n + m + self.offset)
        k_pre, v = k_pre.to(self.device, self.dtype), v.to(self.device, self.dtype)
        self.k_pre[..., n : n + m, :] = k_pre
        self.v[..., n : n + m, :] = v
        self.k[..., n : n + m, :] = self.rope.rotate(k_pre, new_positions)
        if len(stale):
            self._rerotate(stale)

    def truncate(self, n: int) -> None:
        """Forget the tokens appended after the first `n` (valid only if nothing was evicted since:
        appended tokens occupy the slots and bookkeeping entries after them)."""
        self._n = n
        self._len = [n] * self.num_layers

    def _rerotate(self, ranks: np.ndarray) -> None:
        slots = torch.from_numpy(self._slot[ranks]).to(self.device)
        positions = torch.from_numpy(ranks + self.offset).to(self.device)
        self.rope.ensure(int(ranks[-1]) + self.offset + 1)
        fresh = self.rope.rotate(self.k_pre.index_select(3, slots), positions)
        self.k.index_copy_(3, slots, fresh)

    # ---- accounting --------------------------------------------------------------------------
    def token_bytes(self) -> int:
        """Bytes of K and V per cached token, over all layers and the batch."""
        return 2 * self.num_layers * self.batch * self.kv_heads * self.head_dim * self.k.element_size()

    def kv_bytes(self) -> int:
        """Exact bytes of the keys and values attention sees now."""
        return self.length * self.token_bytes()

    def allocated_bytes(self) -> int:
        """Bytes held by the buffers (capacity, and the pre-RoPE key copy when re-indexing)."""
        n = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_pre) if t is not None)
        return n
