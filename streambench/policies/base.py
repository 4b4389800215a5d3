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

import abc
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from streambench.errors import ConfigError

if TYPE_CHECKING:
    import torch


# What the engine can observe for a policy (streambench/engine/observe.py), by the name a policy
# declares in `observes`: per-slot statistics, the attention of a query window, the logits.
OBSERVATIONS = frozenset(
    {
        "attention_sum",  # (L, H_kv, n): attention each kept token received since it entered (H2O)
        "attention_last",  # (L, H_kv, n): the last query's attention (TOVA)
        "key_norm",  # (L, H_kv, n): each kept key's L2 norm
        "window_attention",  # (L, H_kv, groups, w, n): the last w queries' attention, as the cache is now
        "logits",  # score_tokens(ids, logits) is called after each forward (SirLLM's entropy)
        "keys",  # (L, H_kv, n, D): kept keys rotated at ranks 0..n-1, as a prefill of them holds them
        "held_keys",  # ((L, H_kv, n, D), offset): kept keys as the cache holds them, at rank + offset
        "key_shape",  # (L, H_kv, n, D) zeros expanded from one (no memory): the keys' shape, dtype, device
        "values",  # (L, H_kv, n, D): kept values
        "hidden_states",  # L x (w, hidden): the inputs to each governed attention layer of the last w tokens
        "attention_modules",  # the governed attention modules (rotary_emb attached), for presses
    }
)


@dataclass(frozen=True)
class CacheView:
    """Read-only state a policy decides on. Arrays are per kept token, in time order."""

    length: int  # tokens in the cache now
    incoming: int  # tokens about to be fed; the result must leave room for them
    budget: int  # keys each query may see, including itself
    positions: np.ndarray  # original position of each kept token: (n,), or (L, H, n) per head
    scores: np.ndarray  # per-token score the policy recorded (e.g. decayed surprisal), same shape
    observed: Mapping[str, Any] = field(default_factory=dict)  # what the policy declared it observes:
    #   attention_sum, attention_last, key_norm: (L, H_kv, n) float32 tensors in each head's rank order
    #   window_attention: (L, H_kv, groups, w, n) or None before any query; see streambench/engine/observe.py
    num_layers: int = 1
    kv_heads: int = 1

    @property
    def target(self) -> int:
        """How many tokens may stay so that the incoming ones fit in the budget (per lane on
        average, for a policy keeping unequal counts)."""
        return self.budget - self.incoming

    @property
    def valid(self) -> np.ndarray:
        """True at ranks holding a token, False at the pads of lanes that keep fewer tokens than
        others (a ragged cache: positions -1, always at a lane's first ranks); shaped as positions."""
        return self.positions >= 0

    @property
    def lane_valid(self) -> np.ndarray:
        """`valid` for every (layer, KV head) lane: (L, H_kv, n), a read-only broadcast."""
        return np.broadcast_to(self.valid, (self.num_layers, self.kv_heads, self.length))

    @property
    def held(self) -> np.ndarray:
        """Tokens each (layer, KV head) lane holds now: (L, H_kv)."""
        return self.lane_valid.sum(-1)


@dataclass
class CachePolicy:
    """Base class. Subclasses are dataclasses registered with `@register_policy("name")`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `streambench list`
    # What the engine must provide. Declared, so the engine never asks isinstance(policy, X).
    recompute: ClassVar[bool] = False  # no cache at all: re-encode the window every step
    retrieves: ClassVar[bool] = False  # a RetrievalPolicy: on_evict / recall hooks (longmem)
    # Observations the engine provides (streambench/engine/observe.py), only to policies that declare them:
    # "attention_sum", "attention_last", "key_norm", "window_attention", "logits" (score_tokens).
    observes: ClassVar[frozenset] = frozenset()
    observation_window: ClassVar[int] = 0  # queries kept for "window_attention" (a property where set by a field)
    # The fields that, all given, fix the budget themselves (`-p recent_size=252` needs no --budget).
    sizes: ClassVar[tuple[str, ...]] = ()
    # Scores a whole context at once (kvpress's prefill-only presses): runs only where the task
    # prefills densely and compresses once (`Task.compresses_once`), refused for a stream.
    prefill_only: ClassVar[bool] = False
    # Compress-once keeps the kept keys at their fed positions (kvpress's protocol); True: they are
    # re-indexed to ranks and the question goes on at the kept count (kvpress's KeyRerotationPress).
    compress_reindexes: ClassVar[bool] = False
    # Keeps unequal counts per layer or KV head (PyramidKV, AdaKV, DuoAttention): `select` may
    # return a keep mask, the budget bounds the mean count over lanes, and the engine masks each
    # lane's pads out of attention (so it routes attention through its own function, eagerly).
    uneven: ClassVar[bool] = False
    # Why a batch's float arithmetic (another summation order, ~1e-6) can change this policy's
    # keep-set where alone it would not (None: it does not in practice). Such a policy runs alone
    # rather than in a group of policies over one stream (runs/grouping.py), to keep its numbers.
    batch_sensitive: ClassVar[str | None] = None
    # Its keep-set is a function of device tensors alone and `dropped` computes it there (a
    # ScoredPolicy whose `score` reads only `view.observed`, `length` and `incoming`; sirllm from
    # its scores): the engine may keep the step on the device (engine/cache/device_steps.py),
    # where `view.positions` and `view.scores` are device tensors.
    device_select: ClassVar[bool] = False

    budget: int | None = None

    def __post_init__(self) -> None:
        self.configure()

    # ---- to override ---------------------------------------------------------------------------
    def configure(self) -> None:
        """Derive sizes from the budget (or the budget from sizes) and validate. Raise ConfigError."""

    def select(self, view: CacheView) -> np.ndarray:
        """Ranks of the tokens to keep. The contract, which the engine checks at every eviction (a
        violation is one error naming the policy): an integer array of shape (k,) (one keep-set for
        every layer and head), (L, k) (one per layer) or (L, H_kv, k) (one per layer and KV head),
        each set sorted and unique (time order, ranks *within* its head once sets differ), every
        rank in [0, view.length), the same k <= `view.target` everywhere. A policy declaring
        `uneven` may instead return a bool keep mask of shape (L, n) or (L, H_kv, n): each lane
        its own count, the mean count over lanes <= `view.target`, no pad kept (`view.valid`)."""
        from streambench.errors import PolicyContractError

        raise PolicyContractError(
            f"policy {self.name} does not implement select(view), which every evicting policy needs"
        )

    def lane_limits(self, view: CacheView) -> tuple[int | None, int | None]:
        """An `uneven` policy's promise about each lane's count at this eviction: (floor, cap),
        either None. The engine holds every keep mask to it (a lane holding fewer than the floor
        keeps all it holds), so a broken allocation is one error naming the policy."""
        return None, None

    def score_tokens(self, ids, logits) -> np.ndarray:
        """Policies observing "logits": a score (B, c) for each fed token, stored with it and read
        back as `view.scores` (SirLLM's surprisal). Called after every forward."""
        from streambench.errors import PolicyContractError

        raise PolicyContractError(
            f"policy {self.name} observes logits but does not implement score_tokens(ids, logits)"
        )

    def score_tokens_on_device(self, ids, logits) -> Any:
        """`score_tokens` as a float64 tensor on the logits' device (a device-side step); by
        default through the host."""
        import torch  # policies import no torch until they run

        return torch.as_tensor(self.score_tokens(ids, logits), dtype=torch.float64, device=logits.device)

    def dropped(self, view: CacheView) -> Any:
        """The ranks that leave, computed on the device: (L, H, k) or (L, k) per lane, (k,) for
        the whole stream (a `device_select` policy implements it)."""
        raise NotImplementedError(f"policy {self.name} does not choose on the device")

    def state(self) -> Any:
        """Per-stream state a branch must not change (saved by checkpoint, restored by rollback)."""
        return None

    def restore(self, state: Any) -> None:
        pass

    def new_round(self, scores: np.ndarray) -> np.ndarray:
        """Called once per user turn by dialogue tasks; may rescale stored scores (SirLLM's decay)."""
        return scores

    def reset(self) -> None:
        """A new stream starts (a policy with state, such as a memory bank, clears it)."""

    def check_deferred(self) -> None:
        """Raise what a step on the device could not raise without waiting for it (a press's NaN
        scores): the session calls this between streams and when it ends."""

    def bind(self, model) -> None:
        """A session starts on this transformers model: a policy that learned something per model
        loads it here (kvpress's `post_init_from_model`). Raise ConfigError when it cannot."""

    def stats(self) -> dict[str, float]:
        """Metrics of the policy's own state at the end of a run (e.g. its memory bank's size)."""
        return {}

    # ---- shared helpers ------------------------------------------------------------------------
    @property
    def evicts(self) -> bool:
        return self.budget is not None

    @property
    def band(self):
        """A position-only policy declares here what each query sees when fed token by token
        (a `Band`: sinks plus a recent window), which lets the engine feed whole
        chunks token-exactly. None (the default): the keep-set depends on content, or is not of
        that shape, and exact feeding goes token by token. A declared band is checked against the
        keep-set before every exact chunk."""
        return None

    @property
    def max_incoming(self) -> int | None:
        """Largest chunk fed in one forward; longer inputs are split (None: no limit). Default:
        the budget less the `start_size` sinks, when the policy has that field, so a budget-sized
        chunk never takes the sinks' room (with k = 0 allowed, it would evict every sink)."""
        if self.budget is None:
            return None
        return self.budget - self.protected_start

    @property
    def protected_start(self) -> int:
        """The first tokens the policy always keeps: its `start_size` field, 0 without one."""
        return int(getattr(self, "start_size", 0) or 0)

    def args(self) -> dict[str, Any]:
        """The policy's hyperparameters, as recorded in results and presets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def _require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{self.name}: {message}")

    def _check_int(self, name: str, minimum: int) -> int:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{self.name}: {name} must be an integer, got {value!r}")
        self._require(bool(value >= minimum), f"{name} must be >= {minimum}, got {value}")
        return int(value)

    def _split_budget(self, fixed: dict[str, int], rest: str, minimum: int = 1) -> None:
        """The budget split every sized policy repeats: `fixed` parts (name -> tokens they take,
        already checked integers) plus `rest`, which, when not given, takes what the budget leaves.
        Sets `self.budget` to the sum, and refuses a split that disagrees with a given budget."""
        taken = sum(fixed.values())
        parts = " + ".join(fixed)
        if getattr(self, rest) is None:
            budget = self.budget
            if budget is None:
                raise ConfigError(f"{self.name}: needs a budget or {rest}")
            if fixed and budget - taken < minimum:
                what = f"{parts} = {taken}" if len(fixed) > 1 else f"{parts} {taken}"
                self._require(False, f"budget {self.budget} must be {'above' if minimum == 1 else 'at least'} {what}")
            setattr(self, rest, budget - taken)
        self._check_int(rest, minimum)
        total = taken + getattr(self, rest)
        self._require(
            self.budget in (None, total),
            f"{parts + ' + ' if parts else ''}{rest} = {total} disagrees with budget {self.budget}",
        )
        self.budget = total


@dataclass(frozen=True)
class Band:
    """What the query at stream position t sees when the policy is fed token by token: tokens
    [0, sinks) at the distance min(t, budget - 1) - i, and tokens [max(sinks, t - width + 1), t] at
    their original distance. width None: everything (dense)."""

    sinks: int = 0
    width: int | None = None
    budget: int | None = None

    def kept(self, t: int, incoming: int = 1) -> np.ndarray:
        """Stream positions the cache holds once tokens [0, t) are in and room is made for
        `incoming` more: with incoming=1, what the query at t sees besides itself (the engine
        checks a declared band against the policy's own keep-set with this)."""
        sinks = min(self.sinks, t)
        low = 0 if self.width is None else max(sinks, t - self.width + incoming)
        return np.concatenate([np.arange(sinks), np.arange(max(low, sinks), t)]).astype(np.int64)


class BandPolicy(CachePolicy):
    """A position-only policy stated once, as its `band` (sinks plus a recent window): `select`
    is derived from it, so the keep-set and the band the engine feeds exact chunks by cannot
    disagree. StreamingLLM is `Band(start_size, recent_size, budget)`; window `Band(0, size,
    budget)`; dense `Band()`. Subclasses are dataclasses that define `band`."""

    # (its drops are a run of consecutive ranks known from the counts: made on the device by
    # `arange`, so a step alone uploads no index arrays, engine/cache/device_steps.py)
    device_select = True

    @property
    def band(self) -> Band:
        raise NotImplementedError(f"policy {self.name} is a BandPolicy but defines no band")

    def dropped(self, view: CacheView) -> np.ndarray:
        """The ranks that leave, from the counts alone (host-known: the session makes them on the
        device as one `arange`)."""
        return np.setdiff1d(np.arange(view.length), self.select(view), assume_unique=True)

    def select(self, view: CacheView) -> np.ndarray:
        band = self.band
        if band.width is None:
            return np.arange(view.length)
        start = min(band.sinks, view.length)
        recent = recent_ranks(view.length, view.target - start)
        return np.concatenate([np.arange(start), recent[recent >= start]])


class ScoredPolicy(CachePolicy):
    """A policy that scores every cached token and keeps the highest (kvpress's ScorerPress:
    `score(...) -> (B, H_kv, n)`; here per layer: `score(view) -> (L, H_kv, n)` or `(L, n)`, a
    torch tensor or numpy array, higher stays). What every scorer repeats is done here once:
    the `start_size` sinks and the `recent_size` newest tokens (incoming ones counted), where the
    policy has those fields, always stay; room for the sinks is left by `max_incoming`; the
    top-k per head is `top_ranks`. A whole policy is a dataclass with its fields, `observes` and
    `score`:

        @register_policy("keydiff-ish")
        @dataclass
        class LowNorm(ScoredPolicy):
            observes = frozenset({"key_norm"})
            start_size: int = 4

            def score(self, view):
                return -view.observed["key_norm"]
    """

    def score(self, view: CacheView) -> Any:
        """(L, H_kv, n) or (L, n) scores of the cached tokens, higher stays; None: nothing to
        score by yet (the most recent tokens stay)."""
        raise NotImplementedError(f"policy {self.name} is a ScoredPolicy but does not implement score(view)")

    def configure(self) -> None:
        """Checks the protected sizes against the budget; a policy with more fields extends it."""
        for name in ("start_size", "recent_size"):
            if hasattr(self, name):
                self._check_int(name, 0)
        self._require(self.budget is not None, "needs a budget")
        assert self.budget is not None
        if hasattr(self, "start_size"):
            self._require(
                self.budget > self.protected_start,
                f"budget {self.budget} must be above start_size {self.protected_start}",
            )
        if hasattr(self, "recent_size"):
            recent = self.recent_size
            self._require(
                recent < self.budget,
                f"recent_size {recent} must be below budget {self.budget} (protected: {self.protected_start + recent})",
            )

    def kept(self, view: CacheView) -> int:
        """How many tokens stay (default: all the incoming ones leave room for)."""
        return view.target

    def select(self, view: CacheView) -> np.ndarray:
        scores, count = self._protected_scores(view)
        if scores is None:
            return recent_ranks(view.length, count)
        return self.keep_top(scores, count)

    def dropped(self, view: CacheView) -> Any:
        """The ranks each head drops, (..., n - kept) in any order, left on the scores' device:
        `select`'s keep-set as its complement, for a step that never waits on the device
        (engine/cache/device_steps.py). A numpy array where nothing was scored (the oldest go)."""
        scores, count = self._protected_scores(view)
        if scores is None:
            return np.arange(max(view.length - count, 0))
        return self.drop_lowest(scores, scores.shape[-1] - count)

    def _protected_scores(self, view: CacheView) -> tuple[Any, int]:
        """(scores with the protected sinks and recent tokens at +inf, or None; how many stay)."""
        import torch  # policies import no torch until they run

        count = self.kept(view)
        scores = self.score(view)
        if scores is None:
            return None, count
        scores = torch.as_tensor(scores).float()
        sinks = min(self.protected_start, count)
        recent = min(max(int(getattr(self, "recent_size", 0) or 0) - view.incoming, 0), count - sinks)
        if sinks or recent:
            scores = scores.clone()
            scores[..., :sinks] = float("inf")
            if recent:
                scores[..., view.length - recent :] = float("inf")
        return scores, count

    def keep_top(self, scores: torch.Tensor, count: int) -> np.ndarray:
        """The `count` ranks each head keeps, sorted: the complement of `drop_lowest`."""
        return kept_ranks(scores.shape, self.drop_lowest(scores, scores.shape[-1] - count))

    def drop_lowest(self, scores: torch.Tensor, drop: int) -> torch.Tensor:
        """The `drop` lowest-scored ranks of every head (ties: the newest leaves): `bottom_ranks`."""
        return bottom_ranks(scores, drop)


class RetrievalPolicy(CachePolicy, abc.ABC):
    """A policy with a memory outside the cache (longmem). The session hands it every token that
    leaves the cache (`on_evict`) and, every `refresh` tokens and at each user turn, asks it what
    to bring back (`recall`), splicing the answer into the cache. One memory per session: batch 1.
    Subclasses are dataclasses with a `refresh` field (tokens between recalls)."""

    retrieves: ClassVar[bool] = True
    refresh: int  # (a field of every subclass: tokens between recalls)

    @abc.abstractmethod
    def on_evict(self, positions: np.ndarray, k_pre, values) -> None:
        """Tokens leaving the cache: stream positions (T,), pre-RoPE keys and values (L, B, H, T, D)."""

    @abc.abstractmethod
    def recall(self, view: CacheView, query):
        """Given the last token's pre-RoPE query (L, H_kv, D), return (keep, at, positions, k_pre,
        values): ranks that stay and m tokens to insert at rank `at`; or None to change nothing."""


def check_declarations(cls: type) -> None:
    """A policy's declarations, checked when it registers (built-in or plugin), so a typo is one
    line naming the policy, not a KeyError inside `select` at the first eviction."""
    name = getattr(cls, "name", "") or cls.__name__
    observes: Any = getattr(cls, "observes", frozenset())
    if not isinstance(observes, (set, frozenset)) or not all(isinstance(o, str) for o in observes):
        raise ConfigError(f"policy {name}: observes must be a set of names, got {observes!r}")
    unknown = sorted(set(observes) - OBSERVATIONS)
    if unknown:
        raise ConfigError(
            f"policy {name}: observes {', '.join(unknown)}, which the engine does not provide "
            f"(it provides {', '.join(sorted(OBSERVATIONS))})"
        )
    fields = {f.name for f in dataclasses.fields(cls) if f.init} if dataclasses.is_dataclass(cls) else set()
    sizes = getattr(cls, "sizes", ())
    if not isinstance(sizes, tuple) or not set(sizes) <= fields:
        missing = sorted(set(sizes) - fields) if isinstance(sizes, tuple) else sizes
        raise ConfigError(f"policy {name}: sizes names {missing!r}, which are not fields of the policy")


# ---- helpers policies share -----------------------------------------------------------------------
def recent_ranks(length: int, count: int) -> np.ndarray:
    """The last `count` ranks of a cache of `length` tokens (a recent window)."""
    return np.arange(max(length - count, 0), length)


def top_ranks(scores, count: int, protect: slice | None = None) -> np.ndarray:
    """The `count` highest-scored ranks of every head, sorted (time order): (..., count). Ranks
    in `protect` are always kept (and counted in `count`)."""
    scores = scores.float()
    if protect is not None:
        scores = scores.clone()
        scores[..., protect] = float("inf")
    return kept_ranks(scores.shape, bottom_ranks(scores, scores.shape[-1] - count))


def bottom_ranks(scores, drop: int):
    """The `drop` lowest-scored ranks of every head, on the scores' device, in no order: (..., drop).
    Streaming evicts one token per step most of the time: that is an argmin (ties: the newest
    goes), otherwise a bottom-k."""
    import torch  # policies import no torch until they run

    n = scores.shape[-1]
    if drop <= 0:
        return torch.zeros((*scores.shape[:-1], 0), dtype=torch.long, device=scores.device)
    if drop == 1:
        return (n - 1) - scores.flip(-1).argmin(dim=-1, keepdim=True)
    return torch.topk(scores, drop, dim=-1, largest=False, sorted=False).indices


def kept_ranks(shape, gone) -> np.ndarray:
    """The ranks not in `gone` (..., drop), sorted, on the host: (..., n - drop)."""
    import torch  # policies import no torch until they run

    n = shape[-1]
    ranks = torch.arange(n, device=gone.device)
    if gone.shape[-1] == 0:
        return ranks.expand(shape).cpu().numpy()
    kept = torch.ones(shape, dtype=torch.bool, device=gone.device).scatter_(-1, gone, False)
    return ranks.expand(shape)[kept].view(*shape[:-1], n - gone.shape[-1]).cpu().numpy()


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last (time) axis, same length (kvpress SnapKVPress: avg_pool1d,
    padding kernel // 2, stride 1; zero padding counted, as avg_pool1d does)."""
    if kernel <= 1:
        return scores
    import torch.nn.functional as F  # policies import no torch until they run

    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pooled = F.avg_pool1d(flat, kernel_size=kernel, padding=kernel // 2, stride=1)
    return pooled[..., : shape[-1]].reshape(shape)
