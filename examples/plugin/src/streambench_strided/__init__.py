"""Example streambench plugin (entry points in ../../pyproject.toml).

`strided` keeps attention sinks, a recent window and one token in every `stride` before it: a
cheap long-range memory that needs no scores. `lorem-ppl` is perplexity on a fixed built-in text,
showing a task plugin: a subclass of a streambench task with its own defaults.
"""

from dataclasses import dataclass

import numpy as np

from streambench.policies.base import CachePolicy, CacheView
from streambench.tasks.perplexity import PerplexityTask

LOREM = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. " * 40).strip()


@dataclass
class StridedPolicy(CachePolicy):
    """Sinks + one token per `stride` among the older tokens + the most recent tokens."""

    summary = "sinks + every stride-th older token + recent window (example entry-point plugin)"
    sizes = ("recent_size",)
    start_size: int = 4
    stride: int = 4
    recent_size: int | None = None

    def configure(self) -> None:
        self._check_int("stride", 1)
        if self.recent_size is None and self.budget is not None:
            self.recent_size = max(1, (self.budget - self.start_size) // 2)
        self._require(self.budget is not None, "needs a budget")
        self._check_int("recent_size", 1)
        self._require(
            self.budget > self.start_size + self.recent_size - 1, "budget must exceed start_size + recent_size - 1"
        )

    @property
    def max_incoming(self) -> int:
        return self.recent_size

    def select(self, view: CacheView) -> np.ndarray:
        target, n = view.target, view.length
        sinks = np.arange(min(self.start_size, n, target))
        recent = np.arange(max(n - min(self.recent_size - view.incoming, target - len(sinks)), len(sinks)), n)
        older = np.arange(len(sinks), recent[0] if len(recent) else n)
        room = target - len(sinks) - len(recent)
        strided = older[::-1][:: self.stride][:room][::-1]
        return np.concatenate([sinks, strided, recent]).astype(np.int64)


@dataclass
class LoremPerplexity(PerplexityTask):
    """Streaming perplexity over a fixed pangram text (no file, no download)."""

    summary = "perplexity on a built-in pangram text (example task plugin)"
    text: str = "lorem"
    tokens: int = 256

    def configure(self) -> None:
        self._require(isinstance(self.tokens, int) and self.tokens >= 2, "tokens must be an integer >= 2")

    def token_ids(self, tokenizer, source=None):
        return tokenizer(LOREM)["input_ids"][: self.tokens]
