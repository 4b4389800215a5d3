"""snapkv: keep what an observation window of recent queries attends to, per layer and KV head."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import CacheView, ScoredPolicy, pool


@register_policy("snapkv")
@dataclass
class SnapKVPolicy(ScoredPolicy):
    """SnapKV (Li et al., arXiv:2404.14469): the attention of the last `window` queries over the
    prefix predicts what generation will attend to. kvpress's SnapKVPress computes it once at
    prefill: window attention averaged over the window's queries, average-pooled along the sequence
    (`kernel`), averaged over each KV group's query heads; the window itself always stays.

    Streaming form (our choice; the paper compresses once): eviction happens when the cache is full
    and at most every `interval` tokens, evicting `interval` at once, so the cost of scoring is paid
    once per `interval` tokens. The window's queries (their pre-RoPE copies, recorded as they were
    fed) are rotated at the last `window` positions of the cache and attend to it as it is then,
    causally inside the window. Defaults: kernel 5 as SnapKVPress; window 64 as SnapKVPress and
    interval 16, each capped for small budgets (a quarter and a sixteenth of the budget: at budget
    64, a window of 64 would keep only the window, i.e. be the `window` policy)."""

    summary = "attention of the last `window` queries, pooled (SnapKV), per layer and KV head"
    observes = frozenset({"window_attention"})
    device_select = True
    window: int | None = None
    kernel: int = 5
    interval: int | None = None

    def configure(self) -> None:
        self._require(self.budget is not None, "needs a budget")
        self._require(self.budget >= 2, f"budget must be >= 2, got {self.budget}")
        if self.window is None:
            self.window = min(64, max(1, self.budget // 4))
        self._check_int("window", 1)
        if self.interval is None:  # (the third bound only binds for a window given near the budget)
            self.interval = max(1, min(16, self.budget // 16, self.budget - self.window))
        self._check_int("kernel", 1)
        self._check_int("interval", 1)
        # What is asked for is what runs (and is recorded): sizes that do not fit are refused
        self._require(
            self.window <= self.budget - 1,
            f"window must be at most budget - 1 = {self.budget - 1} "
            f"(at least one scored token besides the window), got {self.window}",
        )
        self._require(
            self.interval <= self.budget - self.window,
            f"interval must be at most budget - window = {self.budget - self.window}, got {self.interval}",
        )
        self._window, self._interval = self.window, self.interval

    @property
    def observation_window(self) -> int:
        return self._window

    @property
    def max_incoming(self) -> int:
        return self.budget - self._window

    def kept(self, view: CacheView) -> int:
        """Evict `interval` tokens at once: scoring is paid once per `interval` tokens."""
        return max(min(view.target, self.budget - self._interval), 0)

    def score(self, view: CacheView):
        target = self.kept(view)
        attn = view.observed["window_attention"]
        if attn is None or target == 0:
            return None  # the most recent tokens stay

        w = min(attn.shape[-2], target)
        prefix = view.length - w  # kvpress scores the tokens before the window; the window stays
        scores = attn.new_full(attn.shape[:2] + (view.length,), float("inf"))
        scores[..., :prefix] = pool(attn[..., :prefix].mean(dim=-2), self.kernel).mean(dim=2)  # queries, pooled, group
        return scores
