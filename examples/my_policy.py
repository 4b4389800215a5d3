"""A policy in a file of the user's: `streambench run --policy examples/my_policy.py:KeepEveryOther`.

Nothing in streambench is edited: the class subclasses CachePolicy, `select` returns the ranks
that stay (the contract in streambench/policies/base.py), and results record this file's sha256.
"""

from dataclasses import dataclass

import numpy as np

from streambench.policies.base import CachePolicy, CacheView


@dataclass
class KeepEveryOther(CachePolicy):
    """Keep the most recent half of the budget, and every other token before it (a dilated
    memory twice as long as the window it replaces)."""

    summary = "recent half + every other older token (example file plugin)"
    start_size: int = 4

    def configure(self) -> None:
        self._check_int("start_size", 0)
        self._require(
            self.budget is not None and self.budget > self.start_size + 2, "needs a budget above start_size + 2"
        )

    @property
    def max_incoming(self) -> int:
        return (self.budget - self.start_size) // 2

    def select(self, view: CacheView) -> np.ndarray:
        target, n = view.target, view.length
        sinks = np.arange(min(self.start_size, n, target))
        recent = np.arange(max(n - (target - len(sinks)) // 2, len(sinks)), n)
        older = np.arange(len(sinks), recent[0] if len(recent) else n)
        room = target - len(sinks) - len(recent)
        dilated = older[::-2][:room][::-1]  # every other, counting back from the window
        return np.concatenate([sinks, dilated, recent]).astype(np.int64)
