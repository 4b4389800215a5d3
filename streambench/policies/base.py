"""The policy interface: a policy answers one question, *which cached tokens stay?*

The engine (StreamCache + StreamSession) owns everything else: moving the kept keys and values,
re-indexing their positions, the per-token scores policies read, and the metrics. So a policy is a
small dataclass whose fields are its hyperparameters (a YAML preset maps onto them 1:1) and whose
`select` is a pure function of a `CacheView`.

Budget convention (used by every policy and by `--budget`): the number of keys each query
attends to, *including its own*. mit-han-lab/streaming-llm's `StartRecentKVCache(4, 252)`
corresponds to budget 257 here; its table's "cache size 256" is budget 256 = 4 sinks + 252 recent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from streambench.errors import ConfigError


@dataclass(frozen=True)
class CacheView:
    """Read-only state a policy decides on. Arrays are per kept token, in time order."""

    length: int  # tokens in the cache now
    incoming: int  # tokens about to be fed; the result must leave room for them
    budget: int  # keys each query may see, including itself
    positions: np.ndarray  # original position of each kept token in the stream
    scores: np.ndarray  # per-token score the policy asked for (e.g. decayed surprisal)

    @property
    def target(self) -> int:
        """How many tokens may stay so that the incoming ones fit in the budget."""
        return self.budget - self.incoming


@dataclass
class CachePolicy:
    """Base class. Subclasses are dataclasses registered with `@register_policy("name")`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `streambench list`
    # What the engine must provide. Declared, so the engine never asks isinstance(policy, X).
    needs_scores: ClassVar[str | None] = None  # score kind the engine computes per token, if any
    recompute: ClassVar[bool] = False  # no cache at all: re-encode the window every step
    retrieves: ClassVar[bool] = False  # has on_evict / recall hooks and a `refresh` interval (longmem)

    budget: int | None = None

    def __post_init__(self) -> None:
        self.configure()

    # ---- to override ---------------------------------------------------------------------------
    def configure(self) -> None:
        """Derive sizes from the budget (or the budget from sizes) and validate. Raise ConfigError."""

    def select(self, view: CacheView) -> np.ndarray:
        """Ranks of the tokens to keep. The contract, which the engine checks at every eviction (a
        violation is one error naming the policy): a 1-D integer array, sorted and unique (time
        order), every rank in [0, view.length), at most `view.target` of them."""
        raise NotImplementedError

    def new_round(self, scores: np.ndarray) -> np.ndarray:
        """Called once per user turn by dialogue tasks; may rescale stored scores (SirLLM's decay)."""
        return scores

    def reset(self) -> None:
        """A new stream starts (a policy with state, such as a memory bank, clears it)."""

    def stats(self) -> dict[str, float]:
        """Metrics of the policy's own state at the end of a run (e.g. its memory bank's size)."""
        return {}

    # Retrieval policies (retrieves = True) also define:
    #   on_evict(positions, k_pre, values)  tokens leaving the cache, (L, B, H, T, D) tensors
    #   recall(view, query) -> (keep, at, positions, k_pre, values) | None
    # The session calls recall every `refresh` tokens and at each user turn, with the last
    # token's pre-RoPE query (layers, kv_heads, head_dim), and splices the result into the cache.

    # ---- shared helpers ------------------------------------------------------------------------
    @property
    def evicts(self) -> bool:
        return self.budget is not None

    @property
    def max_incoming(self) -> int | None:
        """Largest chunk fed in one forward; longer inputs are split (None: no limit)."""
        return self.budget

    def args(self) -> dict[str, Any]:
        """The policy's hyperparameters, as recorded in results and presets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def _require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{self.name}: {message}")

    def _check_int(self, field: str, minimum: int) -> int:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{self.name}: {field} must be an integer, got {value!r}")
        self._require(value >= minimum, f"{field} must be >= {minimum}, got {value}")
        return int(value)


def recent_ranks(length: int, count: int) -> np.ndarray:
    return np.arange(max(length - count, 0), length)
