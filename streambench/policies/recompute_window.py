"""recompute-window: re-encode the last `size` tokens from scratch for every new token."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.policies import register_policy
from streambench.policies.base import CachePolicy, CacheView, recent_ranks


@register_policy("recompute-window")
@dataclass
class RecomputeWindowPolicy(CachePolicy):
    """Sliding window with re-computation (StreamingLLM, arXiv:2309.17453, Fig. 1c): every step
    runs a fresh forward over the window, so each query sees a clean prefix starting at position 0.
    The quality baseline for a fixed budget, at O(size^2) work per token."""

    summary = "re-encode the last `size` tokens every step (quality baseline, O(size^2)/token)"
    recompute = True
    size: int | None = None

    def configure(self) -> None:
        if self.size is None:
            self._require(self.budget is not None, "needs a budget or size")
            self.size = self.budget
        self._check_int("size", 1)
        self._require(self.budget in (None, self.size), f"size {self.size} disagrees with budget {self.budget}")
        self.budget = self.size

    def select(self, view: CacheView) -> np.ndarray:
        return recent_ranks(view.length, view.target)
