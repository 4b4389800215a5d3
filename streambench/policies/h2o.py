"""h2o: heavy hitters (most attention received so far) plus a recent window, per layer and KV head."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import CacheView, ScoredPolicy


@register_policy("h2o")
@dataclass
class H2OPolicy(ScoredPolicy):
    """H2O (Zhang et al., arXiv:2306.14048): a few "heavy hitter" tokens receive most of the
    attention; keeping them beside a recent window keeps quality at a fraction of the cache.
    Per layer and KV head, a token's score is the attention it has received since it entered the
    cache, summed over every later query and itself (FMInference/H2O `H2OKVCache_LayerWise`:
    attention summed over the query axis), averaged over the query heads of its KV group (GQA).

    At each eviction a head keeps its `recent_size` most recent tokens (the incoming ones among
    them) and the `heavy_size` highest-scored others. Defaults: half and half of the budget, as the
    paper's 20% = 10% heavy + 10% recent. Streaming choice (the paper evicts during generation the
    same way): scores keep accumulating while a token stays, never reset or decayed."""

    summary = "heavy hitters (accumulated attention) + recent window, per layer and KV head"
    observes = frozenset({"attention_sum"})
    device_select = True
    sizes = ("heavy_size", "recent_size")
    heavy_size: int | None = None
    recent_size: int | None = None

    def configure(self) -> None:
        if self.recent_size is None and self.heavy_size is None:
            self._require(
                self.budget is not None and self.budget >= 2,
                f"needs a budget >= 2 or heavy_size and recent_size, got {self.budget}",
            )
            self.heavy_size = self.budget // 2
        if self.heavy_size is None:
            self._check_int("recent_size", 1)
            self._split_budget({"recent_size": self.recent_size}, "heavy_size", minimum=0)
        else:
            self._check_int("heavy_size", 0)
            self._split_budget({"heavy_size": self.heavy_size}, "recent_size")

    @property
    def max_incoming(self) -> int:
        """A chunk longer than `recent_size` (a dialogue turn) takes the recent part's room first,
        then heavy hitters' (each head keeps its highest-scored tokens)."""
        return max(self.budget - 1, 1)

    def score(self, view: CacheView):
        return view.observed["attention_sum"]
