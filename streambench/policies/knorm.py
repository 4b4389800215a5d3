"""knorm: keep the keys of lowest L2 norm, per layer and KV head."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.policies import register_policy
from streambench.policies.base import CachePolicy, CacheView, top_ranks


@register_policy("knorm")
@dataclass
class KnormPolicy(CachePolicy):
    """K-norm (Devoto et al., arXiv:2406.11430, "A Simple and Effective L2 Norm-Based Strategy for
    KV Cache Compression"): keys with a low L2 norm draw high attention, so keeping the lowest-norm
    keys approximates attention-based eviction without reading any attention (it works with every
    attention kernel). Per layer and KV head, as kvpress's KnormPress (score = -||k||). The norm is
    the cached key's (RoPE is a rotation, so pre- and post-RoPE norms agree), recorded when the
    token enters. `start_size` sinks and `recent_size` newest tokens are optionally protected
    (default 0 and 0, the paper's setting)."""

    summary = "lowest key L2 norm, per layer and KV head (+ optional sinks, recent window)"
    observes = frozenset({"key_norm"})
    start_size: int = 0
    recent_size: int = 0

    def configure(self) -> None:
        self._check_int("start_size", 0)
        self._check_int("recent_size", 0)
        self._require(self.budget is not None, "needs a budget")
        protected = self.start_size + self.recent_size
        self._require(self.budget > self.start_size, f"budget {self.budget} must be above start_size {self.start_size}")
        self._require(self.recent_size < self.budget, f"recent_size {self.recent_size} must be below budget {self.budget} (protected: {protected})")

    @property
    def max_incoming(self) -> int:
        return self.budget - self.start_size

    def select(self, view: CacheView) -> np.ndarray:
        scores = -view.observed["key_norm"]
        sinks = min(self.start_size, view.target)
        scores[..., :sinks] = float("inf")
        recent = min(max(self.recent_size - view.incoming, 0), view.target - sinks)
        if recent:
            scores[..., view.length - recent :] = float("inf")
        return top_ranks(scores, view.target)
