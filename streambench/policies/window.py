"""window: a sliding window of the most recent tokens, re-indexed to positions 0..size-1."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import Band, BandPolicy


@register_policy("window")
@dataclass
class WindowPolicy(BandPolicy):
    """Window attention (StreamingLLM, arXiv:2309.17453, Fig. 1b): cheap and constant memory, but
    once the first tokens leave the cache the model loses its attention sinks and quality collapses."""

    summary = "sliding window of the last `size` tokens"
    sizes = ("size",)
    size: int | None = None

    def configure(self) -> None:
        self._split_budget({}, "size")

    @property
    def band(self) -> Band:
        return Band(0, self.size, self.budget)
