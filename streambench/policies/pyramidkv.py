"""pyramidkv: more cache for lower layers, less for upper ones (a pyramid), over any scorer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.policies import register_policy
from streambench.policies.allocation import fill, pyramid
from streambench.policies.base import CacheView
from streambench.policies.uneven_base import AllocatingPolicy


@register_policy("pyramidkv")
@dataclass
class PyramidKVPolicy(AllocatingPolicy):
    """PyramidKV (Cai et al., arXiv:2406.02069): attention is spread wide in lower layers and
    concentrated on few tokens in upper ones ("pyramidal information funneling"), so lower layers
    get more cache. Layer budgets form an arithmetic sequence with mean = the budget: beyond the
    `window` every layer keeps, the top layer keeps (budget - window) / beta and the bottom twice
    the mean less that (KVCache-Factory `PyramidKVCluster`, kvpress `PyramidKVPress.get_layer_budget`;
    beta 20 as both). Each layer keeps its tokens by `scorer` (SnapKV's window attention by
    default, as the paper), the same count in every head.

    Streaming form (our choice; the paper compresses a prompt once): a layer cannot keep more than
    it holds, so at the first eviction the pyramid is cut at what every layer holds and the rest
    water-filled over the others (KVCache-Factory caps max_num at the prompt length the same way);
    lower layers then grow by one token per token until the pyramid is reached. The mean over
    layers is the budget (less snapkv's interval) at every eviction."""

    summary = "per-layer budgets decreasing bottom to top (PyramidKV), over any scorer (snapkv default)"
    beta: float = 20.0

    def configure(self) -> None:
        super().configure()
        self._require(
            isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool) and self.beta >= 1,
            f"beta must be a number >= 1, got {self.beta!r}",
        )

    def layer_budgets(self, mean: int, layers: int) -> np.ndarray:
        """The pyramid the layers reach once each holds enough (tested on planted values)."""
        return pyramid(mean, layers, self.start_size + int(self.window or 0), float(self.beta))

    def counts(self, view: CacheView, mean: int, scores=None) -> np.ndarray:
        L, H = view.num_layers, view.kv_heads
        caps = view.held.min(axis=1)  # (every head of a layer holds alike under a pyramid)
        per_layer = fill(self.layer_budgets(mean, L), caps, mean * L)
        return np.broadcast_to(per_layer[:, None], (L, H))
