"""The transformers side of the cache: one `CacheLayerMixin` view per model layer (what code that
walks `cache.layers` sees; `update` is where the model writes), and the per-device shards that
own the buffers."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin

if TYPE_CHECKING:
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


class SlidingLayer(StreamLayer):
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


class Shard:
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
