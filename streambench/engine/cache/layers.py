"""The transformers side of the cache: one `CacheLayerMixin` view per model layer (what code that
walks `cache.layers` sees; `update` is where the model writes), and the per-device shards that
own the buffers."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

if TYPE_CHECKING:
    from streambench.engine.cache.sliding import SlidingWindows
    from streambench.engine.cache.stream_cache import StreamCache


class StreamLayer(CacheLayerMixin):
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
        return cast("StreamCache", self._ref())  # (alive while the model uses it: the session holds it)

    @property
    def keys(self) -> torch.Tensor:
        owner = self._owner
        if owner.quant is not None:
            return owner.held_kv(self._idx)[0]
        shard, i = owner._where[self._idx]
        return shard.k[i, :, :, : owner._len[self._idx]]

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        raise AttributeError("a StreamCache layer is a view of shared buffers: the model writes through update()")

    @property
    def values(self) -> torch.Tensor:
        owner = self._owner
        if owner.quant is not None:
            return owner.held_kv(self._idx)[1]
        shard, i = owner._where[self._idx]
        return shard.v[i, :, :, : owner._len[self._idx]]

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        raise AttributeError("a StreamCache layer is a view of shared buffers: the model writes through update()")

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner._write(self._idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # in ranks, as every full layer shares one mask; a layer of a ragged cache holding fewer
        # slots reads its last columns (observe.py)
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        owner = self._owner
        return owner._len[self._idx] + int(owner._base[self._idx])

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._owner.reset()


class SlidingLayer(StreamLayer):
    """A sliding-window layer: the last `window - 1` stream tokens, in time order (the model's
    sliding mask is index based), with the model's own mask coordinates."""

    is_sliding = True

    @property
    def _slide(self) -> SlidingWindows:
        return cast("SlidingWindows", self._owner.sliding)  # (a cache with sliding layers has one)

    @property
    def keys(self) -> torch.Tensor:
        slide = self._slide
        return slide.k[self._idx][:, :, slide.visible_start : slide.end]

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        raise AttributeError("a StreamCache layer is a view of shared buffers: the model writes through update()")

    @property
    def values(self) -> torch.Tensor:
        slide = self._slide
        return slide.v[self._idx][:, :, slide.visible_start : slide.end]

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        raise AttributeError("a StreamCache layer is a view of shared buffers: the model writes through update()")

    def update(self, key_states, value_states, *args, **kwargs):
        return self._slide.write(self._idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._slide.visible + query_length, 0

    def get_seq_length(self) -> int:
        return self._slide.visible

    def get_max_length(self) -> int:
        return self._slide.window


class Shard:
    """The buffers of consecutive layers that live on one device, (L_s, B, H, capacity, D) each.
    One shard on a single device; a model spread over GPUs (--device-map) has one per device; a
    ragged cache has one per layer, each with its own capacity (eviction.py)."""

    def __init__(self, device: torch.device, start: int, stop: int):
        self.device, self.start, self.stop = device, start, stop
        self.capacity = 0  # slots per lane
        # allocated by StreamCache.grow, which its constructor calls; k_pre stays None in a cache
        # that never re-indexes (dense)
        self.k: torch.Tensor = cast(torch.Tensor, None)
        self.v: torch.Tensor = cast(torch.Tensor, None)
        self.k_pre: torch.Tensor | None = None
        # a quantized cache (quant.py) holds these instead of k, v and k_pre: codes, scales and
        # zeros of the pre-RoPE keys and of the values, and each key's rotation position (int32)
        self.kq: torch.Tensor | None = None
        self.ks: torch.Tensor | None = None
        self.kz: torch.Tensor | None = None
        self.vq: torch.Tensor | None = None
        self.vs: torch.Tensor | None = None
        self.vz: torch.Tensor | None = None
        self.kpos: torch.Tensor | None = None
        self.kgid: torch.Tensor | None = None  # KIVI: each key's block-table entry
        self.spos: torch.Tensor | None = None  # a windowed quantized cache: each slot's stream position
        # per layer, not per slot (quantized.py): KIVI's block tables, the recent tokens' rings
        self.kgs: torch.Tensor | None = None
        self.kgz: torch.Tensor | None = None
        self.kr: torch.Tensor | None = None
        self.vr: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}  # (L_s, B, H, capacity) float32, per slot
        self.slot: torch.Tensor | None = None  # the static decode path's write slot, on the device
        # (L_s, B, H, capacity) bool: False at the pad slots of lanes keeping fewer tokens than
        # others (eviction.py); None while every lane keeps equally many
        self.allowed: torch.Tensor | None = None

    def pre(self) -> torch.Tensor:
        """The pre-RoPE keys (a re-indexing cache keeps them; one that never evicts does not)."""
        if self.k_pre is None:
            raise RuntimeError("this cache was built without re-indexing support (a dense policy)")
        return self.k_pre

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every per-slot tensor (what eviction moves with its token)."""
        held = (self.k, self.v, self.k_pre, self.kq, self.ks, self.kz, self.kgid, self.vq, self.vs, self.vz)
        return tuple(t for t in (*held, self.kpos, self.spos, *self.stats.values()) if t is not None)

    def side(self) -> tuple[torch.Tensor, ...]:
        """Per-layer tensors that do not move with tokens (a quantized cache's tables and rings)."""
        return tuple(t for t in (self.kgs, self.kgz, self.kr, self.vr) if t is not None)

    def index(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)
