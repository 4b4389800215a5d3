"""streamingllm: attention sinks (the first tokens) plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import Band, BandPolicy


@register_policy("streamingllm")
@dataclass
class StreamingLLMPolicy(BandPolicy):
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
