"""A press-sized policy: `streambench run --policy examples/scored_policy.py:LowKeyNorm`."""

from dataclasses import dataclass

from streambench.policies.base import ScoredPolicy


@dataclass
class LowKeyNorm(ScoredPolicy):
    """Keep the lowest-norm keys per layer and KV head (KnormPress), 4 sinks protected."""

    observes = frozenset({"key_norm"})
    start_size: int = 4

    def score(self, view):
        return -view.observed["key_norm"]
