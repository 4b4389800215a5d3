"""streamingllm: attention sinks (the first tokens) plus a recent window."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.policies import register_policy
from streambench.policies.base import Band, CachePolicy, CacheView, recent_ranks


@register_policy("streamingllm")
@dataclass
class StreamingLLMPolicy(CachePolicy):
    """StreamingLLM (Xiao et al., arXiv:2309.17453). Models dump attention mass on the first tokens
    whatever they say ("attention sinks"); keeping `start_size` of them next to a recent window keeps
    the softmax calibrated, so perplexity stays near dense's at constant memory. Positions are
    re-indexed inside the cache as in mit-han-lab/streaming-llm (a token's position is its slot)."""

    summary = "attention sinks (start_size) + recent window"
    start_size: int = 4
    recent_size: int | None = None

    sizes = ("recent_size",)

    def configure(self) -> None:
        self._check_int("start_size", 0)
        self._split_budget({"start_size": self.start_size}, "recent_size")

    @property
    def max_incoming(self) -> int:
        return self.recent_size

    @property
    def band(self) -> Band:
        return Band(self.start_size, self.recent_size, self.budget)

    def select(self, view: CacheView) -> np.ndarray:
        start = min(self.start_size, view.length)
        recent = recent_ranks(view.length, view.target - start)
        return np.concatenate([np.arange(start), recent[recent >= start]])
