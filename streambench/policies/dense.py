"""dense: keep every token at its original position. The quality ceiling and the memory floor."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.policies import register_policy
from streambench.policies.base import Band, CachePolicy, CacheView


@register_policy("dense")
@dataclass
class DensePolicy(CachePolicy):
    """Full attention over the whole stream: the cache grows without bound and, past the model's
    trained context, positions it never saw make perplexity explode (StreamingLLM, Fig. 1a)."""

    summary = "keep everything (no budget; cache grows with the stream)"

    def configure(self) -> None:
        self.budget = None  # a budget means nothing here; recorded as unbounded

    @property
    def band(self) -> Band:
        return Band()

    def select(self, view: CacheView) -> np.ndarray:
        return np.arange(view.length)
