"""adakv: the heads of a layer compete for one pool of cache, each with a floor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.policies import register_policy
from streambench.policies.allocation import pooled_counts, safeguard
from streambench.policies.base import CacheView
from streambench.policies.uneven_base import AllocatingPolicy


@register_policy("adakv")
@dataclass
class AdaKVPolicy(AllocatingPolicy):
    """AdaKV (Feng et al., arXiv:2407.11550, "Ada-KV: Optimizing KV Cache Eviction by Adaptive
    Budget Allocation"): heads differ in how concentrated their attention is, so a layer's budget
    (budget x heads) goes to the top scores over all its heads together, not the top per head.
    A safeguard keeps each head's top `alpha` x budget tokens first (kvpress `AdaKVPress`:
    alpha_safeguard 0.20, at least one token), then the pool takes the highest of the rest.
    Scores are the scorer's (SnapKV's window attention by default, the paper's Ada-SnapKV), which
    are attention probabilities and so comparable across heads. Every layer keeps the same total."""

    summary = "heads of a layer share its pool by score, each with a floor (AdaKV), over any scorer"
    alpha: float = 0.2

    def configure(self) -> None:
        super().configure()
        self._require(
            isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 <= self.alpha <= 1,
            f"alpha must be a number in [0, 1], got {self.alpha!r}",
        )

    def lane_limits(self, view: CacheView) -> tuple[int | None, int | None]:
        """Every head keeps at least its safeguard (checked by the engine at every eviction)."""
        return safeguard(self._scorer.kept(view), float(self.alpha)), None

    def counts(self, view: CacheView, mean: int, scores=None) -> np.ndarray:
        """Per layer, the floor each head keeps, then the pool's remaining places by score."""
        held = view.held
        if scores is None:
            return np.minimum(held, mean)
        return self.allocate(scores, mean, held)

    def allocate(self, scores, mean: int, held: np.ndarray) -> np.ndarray:
        """(L, H) counts from scores (L, H, n): AdaKV's safeguard then top-(mean x H) of the layer."""
        return pooled_counts(scores, mean, held, float(self.alpha))
