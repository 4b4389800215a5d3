"""random: a seeded uniform keep-set, the control every content-aware comparison needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streambench.policies import register_policy
from streambench.policies.base import CachePolicy, CacheView

SCOPES = ("model", "layer", "head")


@register_policy("random")
@dataclass
class RandomPolicy(CachePolicy):
    """Random eviction: at each eviction the tokens that stay are drawn uniformly, without
    replacement, from the cache (after the `start_size` protected sinks, default 0). kvpress's
    RandomPress scores tokens at random at prefill; streaming, the same rule applied at every step
    makes a token's survival geometric in its age. A policy that beats this control has learnt
    something from content; one that does not, has not. Seeded (`seed`), and re-seeded for every
    stream, so a run is reproducible and batched streams share one draw. `scope` draws one set for
    the whole model (default), one per layer, or one per layer and KV head: the control for
    per-layer (TOVA) and per-head (H2O, KNorm, SnapKV) policies."""

    summary = "seeded uniform random keep-set (+ optional start_size sinks): the control"
    start_size: int = 0
    seed: int = 0
    scope: str = "model"
    _rng: np.random.Generator = field(default=None, init=False, repr=False, compare=False)

    def configure(self) -> None:
        self._check_int("start_size", 0)
        self._check_int("seed", 0)
        self._require(self.budget is not None, "needs a budget")
        self._require(self.budget > self.start_size, f"budget {self.budget} must be above start_size {self.start_size}")
        self._require(self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        self.reset()

    def reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def select(self, view: CacheView) -> np.ndarray:
        sets = {"model": (), "layer": (view.num_layers,), "head": (view.num_layers, view.kv_heads)}[self.scope]
        start = min(self.start_size, view.length, max(view.target, 0))
        room = min(max(view.target - start, 0), view.length - start)
        # `room` uniform draws without replacement per set: the first `room` of a random permutation
        order = np.argsort(self._rng.random((*sets, view.length - start)), axis=-1)[..., :room]
        chosen = np.sort(order, axis=-1) + start
        sinks = np.broadcast_to(np.arange(start), (*sets, start))
        return np.concatenate([sinks, chosen], axis=-1).astype(np.int64)
