"""The base of policies that allocate a budget unevenly over a scorer (pyramidkv, adakv)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from streambench.policies.allocation import inner_scorer, protect, recent_mask, top_mask
from streambench.policies.base import CachePolicy, CacheView, ScoredPolicy


@dataclass
class AllocatingPolicy(CachePolicy):
    """Scores every lane's tokens with `scorer` (any registered scoring policy, its own defaults
    at the run's budget), protects each lane's first `start_size` tokens and its last `window`
    (default: the scorer's own protected window: snapkv's observation window, h2o's and knorm's
    recent_size, none for tova), and keeps per lane the count `counts(view)` decides. What is
    observed and how often it evicts (snapkv's interval) are the scorer's."""

    uneven: ClassVar[bool] = True
    # (the union of what any scorer may read; an instance narrows it to its scorer's: configure)
    observes: ClassVar[frozenset] = frozenset({"window_attention", "attention_sum", "attention_last", "key_norm"})

    scorer: str = "snapkv"
    window: int | None = None
    start_size: int = 0

    def configure(self) -> None:
        self._require(self.budget is not None, "needs a budget")
        self._check_int("start_size", 0)
        self._scorer: ScoredPolicy = inner_scorer(self, self.scorer, int(self.budget))
        own = self._scorer.observation_window or int(getattr(self._scorer, "recent_size", 0) or 0)
        if self.window is None:
            self.window = own
        self._check_int("window", 0)
        self._require(
            self.start_size + self.window < self.budget,
            f"start_size + window = {self.start_size + self.window} must be below budget {self.budget}",
        )
        self.observes = self._scorer.observes  # type: ignore[misc]  (an instance's own reading)

    @property
    def observation_window(self) -> int:  # type: ignore[override]
        return self._scorer.observation_window

    @property
    def max_incoming(self) -> int:
        return min(self._scorer.max_incoming or self.budget, self.budget - self.start_size - int(self.window or 0))

    def counts(self, view: CacheView, mean: int, scores=None) -> np.ndarray:
        """(L, H) tokens each lane keeps, mean <= `mean`, given the lanes' scores (L, H, n) or None."""
        raise NotImplementedError

    def select(self, view: CacheView) -> np.ndarray:
        mean = self._scorer.kept(view)  # (snapkv: evict `interval` at once)
        scores = protect(self._scorer.score(view), view, self.start_size, self.window or 0)
        counts = self.counts(view, mean, scores)
        if scores is None:  # nothing observed yet: each lane keeps its most recent
            return recent_mask(view, counts, self.start_size)
        return top_mask(scores, counts)
