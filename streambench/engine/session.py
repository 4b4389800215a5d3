"""StreamSession: one stream through one model under one cache policy.

Tasks talk only to this: `feed(ids)` returns the logits of every fed token, `new_round()` marks a
user turn (SirLLM's decay), `reset()` starts a new stream. Before each forward the session asks the
policy which tokens stay (only when the incoming tokens would overflow the budget) and the cache
moves and re-indexes them; after it, the session records the new tokens and, when the policy
asked for them, their scores (from logits the forward produced anyway, by the policy's
`score_tokens`). Attention observations are recorded inside that same forward (observe.py).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from streambench.engine.cache import StreamCache
from streambench.engine.contract import check_band, checked_keep, checked_max_incoming, prove_band
from streambench.engine.cuda_graphs import decode_mode
from streambench.engine.ragged import RaggedFeeding
from streambench.errors import ConfigError, PolicyContractError
from streambench.models.few_rows import exact_steps, few_rows_linears, install
from streambench.models.loading import LoadedModel
from streambench.models.rope import RotaryTable
from streambench.policies.base import Band, CachePolicy, CacheView, RetrievalPolicy

if TYPE_CHECKING:
    from streambench.engine.cache.quant import KVQuant
    from streambench.engine.cuda_graphs import StaticDecoder
    from streambench.engine.hidden_tap import HiddenStateTap
    from streambench.engine.observe import AttentionObserver
    from streambench.engine.query_tap import QueryTap


def _as_mask(ranks: np.ndarray, n: int) -> np.ndarray:
    """(L, H, k) ranks as an (L, H, n) keep mask (a batch where another stream keeps unequal counts)."""
    mask = np.zeros((*ranks.shape[:-1], n), dtype=bool)
    np.put_along_axis(mask, ranks, True, -1)
    return mask


def token_by_token_reason(policy: CachePolicy) -> str | None:
    """Why an evicting `policy` feeds an exact stream token by token whatever the model (None:
    its band allows exact chunks)."""
    if policy.band is None:
        return f"{policy.name}'s keep-set depends on what the tokens say"
    if policy.observes or policy.retrieves:  # a plugin declaring a band and observing
        return f"{policy.name} observes or retrieves while it feeds"
    return None


def check_group(group: list[CachePolicy]) -> None:
    """What one batch of policies over one stream needs: a shared budget, streams a batch can
    carry (no bank, no recompute, no whole-prefill scoring, no module hooks of a press), one
    observation window among those that observe one."""
    if not group:
        raise ConfigError("a group needs at least one policy")
    budgets = {p.budget for p in group}
    if len(budgets) != 1:
        raise ConfigError(f"a group's policies share one budget, got {sorted(map(str, budgets))}")
    for p in group:
        why = ungroupable(p)
        if why is not None:
            raise ConfigError(f"{p.name} cannot join a group: {why}")
    windows = {p.observation_window for p in group if p.observes & {"window_attention", "queries"}}
    if len(windows) > 1:
        raise ConfigError(f"a group's policies observe one window of queries, got {sorted(windows)}")


def ungroupable(policy: CachePolicy) -> str | None:
    """Why `policy` cannot share a batch with other policies (None: it can)."""
    if policy.recompute:
        return "it re-encodes a window instead of caching"
    if policy.retrieves:
        return "it keeps one memory bank per session"
    if policy.uneven:
        return "its lanes keep unequal counts by design (uneven budgets run alone)"
    if policy.prefill_only:
        return "it scores a whole prefill at once"
    if policy.observes & {"hidden_states", "attention_modules"}:
        return "it reads hidden states or hooks attention modules (a kvpress press)"
    return None


def _without_pads(view: CacheView, pads: int) -> CacheView:
    """A group's stream holding `pads` fewer tokens than the cache's ranks, in every lane: its view
    from rank `pads` on, as it would be alone (its ranks 0..n - pads - 1)."""
    observed: dict[str, Any] = {}
    for name, value in view.observed.items():
        if name == "held_keys":  # (keys at rank + offset): the same keys, `pads` ranks earlier
            keys, offset = value
            observed[name] = (keys[..., pads:, :], offset + pads)
        elif name in ("keys", "values", "key_shape"):
            observed[name] = value[..., pads:, :]
        elif value is None or name == "attention_modules":
            observed[name] = value
        else:  # per-token statistics and window attention: tokens on the last axis
            observed[name] = value[..., pads:]
    return CacheView(
        view.length - pads,
        view.incoming,
        view.budget,
        view.positions[..., pads:],
        view.scores[..., pads:],
        observed,
        view.num_layers,
        view.kv_heads,
    )


def _on_device(drop: Any, device: torch.device) -> torch.Tensor:
    """A policy's dropped ranks as a device tensor. Ranks chosen on the host from counts alone
    (a band's, the oldest ones) are one run of consecutive ranks: made on the device by arange,
    not copied up (a blocking host-to-device copy waits for the device, as `.item()` does)."""
    if isinstance(drop, torch.Tensor):
        return drop.to(device)
    drop = np.asarray(drop, dtype=np.int64)
    first = int(drop.min()) if drop.size else 0
    if drop.ndim == 1 and np.array_equal(drop, np.arange(first, first + len(drop))):
        return torch.arange(first, first + len(drop), device=device)
    return torch.from_numpy(drop).to(device)


def join_keeps(keeps: list[np.ndarray], n: int, layers: int, heads: int) -> np.ndarray:
    """One keep-set per stream, as the cache takes a batch's: (B, k) where every stream keeps the
    same count for every lane, (B, L, H, k) where lanes differ, or (B, L, H, n) bool masks where
    counts differ between streams or lanes."""

    def lanes(k: np.ndarray) -> np.ndarray:  # (k,), (L, k) or (L, H, k) as (L, H, k)
        return np.broadcast_to(k[:, None] if k.ndim == 2 else k, (layers, heads, k.shape[-1]))

    if all(k.dtype != bool for k in keeps):
        if all(k.ndim == 1 for k in keeps) and len({len(k) for k in keeps}) == 1:
            return np.stack(keeps)
        if len({k.shape[-1] for k in keeps}) == 1:
            return np.stack([lanes(k) for k in keeps])
    return np.stack([lanes(k) if k.dtype == bool else _as_mask(lanes(k), n) for k in keeps])


@dataclass(frozen=True)
class StreamState:
    """Where a stream stands, as `checkpoint` saves it and `rollback` returns to it: tokens fed,
    the policy's own state, the observer's, and the cache's mark (kept tokens, the epoch that a
    rollback must not cross, the statistics a branch's queries would add to)."""

    fed: int
    policy: Any
    observed: Any
    cache_mark: tuple[int, int, Any] | None
    window: torch.Tensor | None = None  # recompute-window's token window
    hidden: Any = None  # the hidden-state tap's rings (policies that read hidden states)


@dataclass
class _Branch:
    """What `fork` puts back when its branch ends."""

    cache: StreamCache
    policy: CachePolicy
    fed: int
    recall_at: int
    hold_until: int
    window: torch.Tensor | None
    static: Any
    observed: Any
    tapped: list | None
    hidden: Any


class StreamSession(RaggedFeeding):
    """A stream under an evicting (or dense) cache. Constructed with a policy that recomputes
    instead of caching (recompute-window), it is a `RecomputeSession` (engine/recompute_session.py)."""

    recomputes = False  # True on RecomputeSession: no cache, a window of tokens re-encoded per step
    cache: StreamCache  # (None only on a RecomputeSession, which never reads it)

    def __new__(cls, lm: LoadedModel, policy: CachePolicy, *args: Any, **kwargs: Any) -> StreamSession:
        if cls is StreamSession and policy.recompute:
            from streambench.engine.recompute_session import RecomputeSession

            cls = RecomputeSession
        return super().__new__(cls)

    def __init__(
        self,
        lm: LoadedModel,
        policy: CachePolicy,
        batch_size: int = 1,
        layer_devices: list | None = None,
        decode: str = "eager",
        max_tokens: int | None = None,
        quant: KVQuant | None = None,
        group: list[CachePolicy] | None = None,
        device_steps: bool | None = None,
        bitwise: bool = True,
    ):
        self.lm, self.model, self.policy = lm, lm.model, policy
        # a group's one-token steps as each stream's alone, bit for bit, where the CPU allows
        # (models/few_rows.py); False: the faster few-rows layout (a dialogue batch, whose turns
        # of many tokens are float-close anyway)
        self._bitwise = bitwise
        # a group: one stream per policy, the same tokens fed to all (a sweep's runs in one batch,
        # grouping.py); `policy` is the first, the one whose budget every other shares
        self.group: list[CachePolicy] | None = None
        if group is not None:
            check_group(group)
            policy, self.policy, batch_size = group[0], group[0], len(group)
            self.group = list(group)
        # a quantized cache (engine/cache/quant.py); None or 16 bits: the model's dtype
        self.quant = quant if quant is not None and quant.quantized else None
        if self.quant is not None:
            self.quant.check(lm.info.head_dim)
            if policy.recompute:
                raise ConfigError(f"{policy.name} re-encodes its window every step and holds no cache to quantize")
            if policy.retrieves and self.quant.per_channel:
                raise ConfigError(
                    f"{policy.name} splices tokens back from its bank, which KIVI's key blocks cannot take in: "
                    "use --kv-method token"
                )
        for member in self.group or [policy]:
            member.bind(
                lm.model
            )  # (a policy that learned something per model loads it: kvpress's post_init_from_model)
        # The budget the run was configured with is the one enforced (and recorded), whatever the
        # policy object does to its own fields later; so are its chunk limit and declared band.
        self.budget = budget = policy.budget
        self.evicts = budget is not None
        # keys a query may see before the cache must evict: the budget, or no limit (dense)
        self._room: int = budget if budget is not None else sys.maxsize
        self.max_incoming = checked_max_incoming(policy, budget)
        self.band: Band | None = policy.band if group is None else None
        self._scorers: list[tuple[int, CachePolicy]] = []  # a group's streams whose policy scores logits
        if self.group is not None:
            for member in self.group[1:]:
                limit = checked_max_incoming(member, budget)
                self.max_incoming = (
                    limit if self.max_incoming is None or limit is None else min(self.max_incoming, limit)
                )
            self._scorers = [(b, p) for b, p in enumerate(self.group) if "logits" in p.observes]
        self._band_proven = False
        info = lm.info
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Preallocate what the stream can use: a budget above the tokens streamed needs no buffer of
        # that size (the cache still grows by doubling if a stream turns out longer).
        self._capacity: int
        if budget is not None:
            self._capacity = budget if max_tokens is None else min(budget, max_tokens + 1)
        else:
            self._capacity = max_tokens + 1 if max_tokens is not None else 1024
        layout = lm.layout
        self._kinds = layout.layer_kinds
        self._full_layers = sum(kind != "sliding_attention" for kind in self._kinds)
        self._governed_layers = self._govern_layers()  # per token the policy governs (sliding ones apart)
        self._rope = self._sliding_rope = None
        # (quantized: keys held before RoPE; a group: its ragged streams drop pads, ragged.py)
        if (self.evicts or self.quant is not None or self.group is not None) and not self.recomputes:
            typed = layout.takes_layer_type()  # Gemma 3: local and global RoPE bases
            self._rope = RotaryTable(
                lm.rotary_emb,
                self.device,
                size=2 * self._capacity,
                style=layout.rope_style,
                layer_type="full_attention" if typed else None,
            )
            if typed and layout.sliding_window is not None:
                self._sliding_rope = RotaryTable(
                    lm.rotary_emb,
                    self.device,
                    size=2 * layout.sliding_window,
                    style=layout.rope_style,
                    layer_type="sliding_attention",
                )
        self._layer_devices = None if self.recomputes else (layer_devices or lm.layer_devices())
        self.batch: int = 0
        self._set_batch(batch_size)
        self.decode = decode_mode(decode, policy, self.cache, self.device)
        self._static: StaticDecoder | None = None
        if self.decode != "eager":
            from streambench.engine.cuda_graphs import StaticDecoder

            self._static = StaticDecoder(self, capture=self.decode == "graph")
        from streambench.engine.observe import CAPTURED, STATS, AttentionObserver

        wants = set().union(*(member.observes for member in self.group or [policy]))
        if "window_attention" in wants:
            wants.add("queries")
        self.observer: AttentionObserver | None = None
        if self.cache is not None:
            self.cache.enable_stats(sorted(wants & STATS))
            # (uneven, or a group whose streams keep unequal counts: the route masks pads, recording nothing more)
            if wants & CAPTURED or policy.uneven or self.group is not None:
                window = max(member.observation_window for member in self.group or [policy])
                self.observer = AttentionObserver(self.model, self.cache, frozenset(wants), window=window)
                # (each stream's attention as alone: the model's own where it observes nothing)
                if self._few_rows == "exact":
                    own = [b for b, m in enumerate(cast(list, self.group)) if not (m.observes & CAPTURED or m.uneven)]
                    self.observer.set_exact_rows(own, self.model.config._attn_implementation)
        self.hidden: HiddenStateTap | None = None
        self._attention_modules: list | None = None
        if self.cache is not None and "hidden_states" in wants:
            from streambench.engine.hidden_tap import HiddenStateTap

            self.hidden = HiddenStateTap(self.model, policy.observation_window)
        if "attention_modules" in wants:
            self._attention_modules = self._modules_for_presses()
        self.tap: QueryTap | None = None
        if policy.retrieves:  # retrieval scores bank blocks against the last token's query
            from streambench.engine.query_tap import QueryTap

            self.tap = QueryTap(self.model, info.num_heads, info.kv_heads, info.head_dim)
        self.processed = 0  # every token run through the model, branches included (for tokens/s)
        self.device_evictions = 0  # evictions chosen and applied on the device (device_steps)
        self.branch_peak = (0, 0)  # (KV tokens, bytes) held at most during the last score_branches
        self.fork_depth = 0  # > 0 inside `fork()`: what is fed now will be forgotten
        self._max_tokens = max_tokens
        self.exact_chunks = self._exact_chunks()  # decided once: policy, cache layout and model are fixed
        # Evictions chosen and applied on the device, the bookkeeping kept there between them
        # (engine/cache/device_steps.py): the step then never waits on the device. Asked for
        # (True), or by default on a CUDA device, where a policy selects from device tensors alone.
        # A group: every stream's policy chooses on the device or from counts alone (a band).
        wanted = self.device.type == "cuda" if device_steps is None else device_steps
        members = self.group or [policy]
        self.device_steps = bool(
            wanted
            and any(member.device_select for member in members)
            and all(member.device_select or member.band is not None for member in members)
            and not any(member.uneven for member in members)
            and self.cache is not None
            and self.cache.device_refusal() is None
        )
        self.reset()

    def _modules_for_presses(self) -> list:
        """The governed layers' attention modules, each given the model's rotary embedding as
        `rotary_emb` (what kvpress's `BasePress.__call__` attaches: presses rotate their own
        queries with it). Set in the instance dict, not as a submodule, and removed on close."""
        layout = self.lm.layout
        modules = [a for a, kind in zip(layout.attentions, layout.layer_kinds) if kind != "sliding_attention"]
        for module in modules:
            module.__dict__.setdefault("rotary_emb", self.lm.rotary_emb)
        return modules

    def _govern_layers(self) -> int:
        """The layers the policy's budget governs: the full-attention ones."""
        if not self._full_layers:
            layout = self.lm.layout
            raise ConfigError(
                f"every layer of model type '{layout.model_type}' attends over a sliding window of {layout.sliding_window} tokens: "
                "no full-attention layer for a cache policy to govern (set sliding_window to null in its config.json "
                "to stream it with full attention)"
            )
        return self._full_layers

    # ---- lifecycle: a session adds hooks to a shared model; closing removes them ---------------
    def close(self) -> None:
        """Remove what this session added to the model (longmem's query hooks) and drop its graph.
        The model is shared by every run of a sweep and every lm-eval request: without this, each
        retrieval session would leave one hook per layer behind, run on every later forward."""
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        if self.hidden is not None:
            self.hidden.close()
            self.hidden = None
        for module in self._attention_modules or ():
            module.__dict__.pop("rotary_emb", None)
        self._attention_modules = None
        self._static = None

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:  # (what a step on the device noted, raised now: not over another error)
                self.check_deferred()
        finally:
            self.close()

    def check_deferred(self) -> None:
        """Raise what the policies noted on the device without waiting for it (a press's NaN
        scores, `CachePolicy.check_deferred`): between streams and when the session ends."""
        for member in self.group or [self.policy]:
            member.check_deferred()

    def set_batch(self, batch_size: int) -> None:
        """Run `batch_size` streams from now on (a new cache; the streams start afresh)."""
        if batch_size != self.batch:
            self._set_batch(batch_size)
            if self.observer is not None:
                self.observer.cache = self.cache
            if self._static is not None:
                self._static.capacity = -1  # new buffers: new static inputs and graph
        self.reset()

    def _set_batch(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if batch_size > 1 and self.policy.retrieves:
            raise ConfigError(f"{self.policy.name} keeps one memory bank per session: run it with batch size 1")
        info = self.lm.info
        self.batch = batch_size
        # a batch's forwards of a few rows take the CPU's faster layout, a group's and a stream
        # alone's one-token steps the layout that gives each stream the same bits (models/few_rows.py)
        self._few_rows: str | None = None
        if install(self.model):
            exact = self.group is not None and self._bitwise and exact_steps(self.model)
            self._few_rows = "one" if batch_size == 1 else "exact" if exact else "few"
        layers = self._governed_layers
        self._token_bytes = 2 * batch_size * layers * info.kv_heads * info.head_dim * self.dtype.itemsize
        if not self.recomputes:
            old: StreamCache | None = getattr(self, "cache", None)  # (None: the first batch)
            capacity = old.capacity if old is not None else self._capacity
            stats = old.stat_names if old is not None else ()
            self.cache = StreamCache(
                info.num_layers,
                info.kv_heads,
                info.head_dim,
                self.dtype,
                self.device,
                capacity=capacity,
                rope=self._rope,
                batch_size=batch_size,
                layer_devices=self._layer_devices,
                layer_kinds=self._kinds,
                sliding_window=self.lm.layout.sliding_window,
                sliding_rope=self._sliding_rope,
                quant=self.quant,
            )
            self.cache.enable_stats(stats)
            if self.group is not None:  # (its pads may grow the cache where each stream alone would not)
                self.cache.fix_renorm()
            self._token_bytes = self.cache.token_bytes()

    def reset(self) -> None:
        self.fed = 0  # tokens in the stream since the last reset (branches rolled back are not)
        self.stream_fed = np.zeros(self.batch, dtype=np.int64)  # per stream, where streams are ragged (ragged.py)
        self._recall_at = 0  # retrieval policies: recall when `fed` reaches this
        self._hold_until = 0  # ... but not inside a turn whose room reserve() made
        for member in self.group or [self.policy]:
            member.check_deferred()
            member.reset()
        # a group's streams whose policy chose per layer or head: the others see one keep-set
        # (n,) in their views as alone, though the cache holds lanes for the streams that do
        self._lanes = np.zeros(self.batch, dtype=bool)
        if self.observer is not None:
            self.observer.reset()
        hidden = getattr(self, "hidden", None)
        if hidden is not None:
            hidden.reset()
        if self.cache is not None:
            self.cache.reset()

    # ---- stream ------------------------------------------------------------------------------
    def _exact_chunks(self) -> str | None:
        """Why `feed(ids, exact=True)` goes token by token here (None: it feeds whole chunks).
        Read as the attribute `exact_chunks`, decided once at construction."""
        from streambench.engine.exact_chunks import unsupported

        if self.quant is not None:
            return "a quantized cache reads a forward's own tokens in full precision, the held ones quantized"
        if self.group is not None:
            return "a group's streams each evict by their own policy, token by token"
        if not self.evicts:  # (nothing evicted: the model's own causal forward, sliding masks
            return None  # included, is token-exact)
        why = token_by_token_reason(self.policy)
        if why is not None:
            return why
        if self.cache is not None and self.cache.spread and cast(Band, self.band).sinks:  # (a band: no reason above)
            return "the model is spread over several devices"
        reason = unsupported(self.model)
        return f"this model cannot: {reason}" if reason else None

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Feed token ids of shape (B, c), one row per stream; return logits (B, c, vocab).

        exact=False: the chunk comes in at once, after one eviction that makes room for all of it
        (a dialogue turn, SirLLM's protocol). exact=True: every token's logits, and the cache
        after the chunk, are those of feeding the tokens one at a time (the StreamingLLM protocol),
        in one forward where the policy allows it (streambench/engine/exact_chunks.py), else one token at a time."""
        if exact and ids.shape[1] > 1 and (self.evicts or self.quant is not None):  # (nothing evicted
            # nor quantized: the ordinary causal forward is already token-exact, dense's chunked prefill)
            if self.exact_chunks is None:
                return self._feed_exact(ids)
            return torch.cat([self.feed(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
        limit = self.max_incoming
        if limit is not None and ids.shape[1] > limit:
            return torch.cat([self.feed(ids[:, i : i + limit]) for i in range(0, ids.shape[1], limit)], dim=1)
        self.processed += ids.shape[1]
        cache, count = self.cache, ids.shape[1]
        if self.policy.retrieves and self.fed >= max(self._recall_at, self._hold_until):
            self._recall(count)
        if self.group is not None:
            self._evict_group(count)
        elif cache.mean_length + count > self._room:
            if self.device_steps and cache.device_refusal() is None:
                self._evict_on_device(count)
            else:
                self._evict(self._select(count))
        if self._static is not None and count == 1:
            logits = self._static(ids)
            cache.mark_written(1)
        elif self.observer is not None:
            positions = self.observer.positions = cache.next_positions(count)
            with self.observer, few_rows_linears(self._few_rows):
                logits = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
            self.observer.flush(count)
        else:
            with few_rows_linears(self._few_rows):
                logits = self.model(
                    input_ids=ids, position_ids=cache.next_positions(count), cache=cache, use_cache=True
                ).logits
        if logits.device != self.device:  # a model spread over GPUs ends on the last one
            logits = logits.to(self.device)
        if self.group is not None:
            scores = self._group_scores(ids, logits)
        else:
            scores = None
            if "logits" in self.policy.observes:
                scores = (self.policy.score_tokens_on_device if self.device_steps else self.policy.score_tokens)(
                    ids, logits
                )
        if self.hidden is not None:
            self.hidden.commit()
        cache.commit(np.arange(self.fed, self.fed + count), scores)
        self.fed += count
        return logits

    def _feed_exact(self, ids: torch.Tensor) -> torch.Tensor:
        """One forward for the chunk, each query masked to what it sees token by token."""
        from streambench.engine.exact_chunks import ChunkMask

        cache, count = self.cache, ids.shape[1]
        self.processed += count
        band = cast(Band, self.band)  # (exact chunks: a declared band, exact_chunks is None)
        if not self._band_proven:
            layers, heads = cache.num_layers, cache.kv_heads
            prove_band(self.policy, band, self._room, self._max_tokens, layers, heads)
            self._band_proven = True
        if cache.length + 1 > self._room:
            self._evict(self._select(1))  # the keep-set before the chunk's first token
        n, start = cache.length, self.fed
        slots = np.empty(n + count, dtype=np.int64)
        held = cache.positions
        if n:
            check_band(self.policy, band, held, start, 1)
            slots[cache.slots] = held
        slots[n:] = np.arange(start, start + count)
        positions = cache.next_positions(count)
        if self.evicts and not cache.uniform:
            raise RuntimeError("exact chunks need streams that evict alike")
        if self._rope is not None:
            self._rope.ensure(n + count + cache.offset + 1)
        device = self.device
        mask = ChunkMask(
            self.model,
            band,
            torch.from_numpy(slots).to(device),
            torch.arange(start, start + count, device=device),
            positions[0],
            self._rope,
            cache.offset,
        )
        with mask, few_rows_linears(self._few_rows):
            logits = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
        if logits.device != device:
            logits = logits.to(device)
        cache.commit(np.arange(start, start + count))
        self.fed += count
        if cache.length > self._room:
            self._evict(self._select(0))  # the keep-set after the chunk's last token
            check_band(self.policy, band, cache.positions, self.fed, 0)
        return logits

    def _hand_over(self, keep: np.ndarray) -> None:
        """Retrieval policies get the tokens about to leave the cache (for their bank)."""
        if self.policy.retrieves:
            gone = np.setdiff1d(np.arange(self.cache.length), keep, assume_unique=True)
            if len(gone):
                cast(RetrievalPolicy, self.policy).on_evict(*self.cache.take(gone))

    def _evict(self, keep: np.ndarray) -> None:
        self._hand_over(keep)
        self.cache.evict(keep)

    def _evict_group(self, incoming: int | np.ndarray) -> None:
        """A group: each stream evicts when its own policy would alone (its count plus what comes
        in passes the budget), choosing by its own policy from the view it would have alone (its
        pads cut off: a stream keeping fewer than another holds pads at its lanes' first ranks,
        eviction.py); a stream with room keeps all it holds. The keep-sets are joined into the
        one form the cache takes. `incoming`: for every stream, or one count each (ragged.py)."""
        cache, batch = self.cache, self.batch
        n, layers, heads = cache.length, cache.num_layers, cache.kv_heads
        held = cache.lane_counts()[0, :, 0] if cache.ragged else np.full(batch, n)  # (a stream's lanes hold alike)
        coming = np.broadcast_to(np.asarray(incoming, dtype=np.int64), (batch,))
        full = held + coming > self._room
        if not full.any():
            return
        if self.device_steps and full.all() and not cache.ragged and self._evict_group_on_device(coming):
            return
        keeps = []
        for b in range(batch):
            pads = n - int(held[b])
            if full[b]:
                view = self.view(int(coming[b]), b)
                keep = self._checked(_without_pads(view, pads) if pads else view, int(coming[b]), stream=b)
                self._lanes[b] |= keep.ndim > 1
                if pads:  # back to the cache's ranks
                    keep = np.pad(keep, [(0, 0)] * (keep.ndim - 1) + [(pads, 0)]) if keep.dtype == bool else keep + pads
            elif pads:  # (everything it holds: the ranks after its pads)
                keep = np.arange(pads, n)
            else:
                keep = np.arange(n)
            keeps.append(keep)
        self._evict(join_keeps(keeps, n, layers, heads))

    def _evict_group_on_device(self, coming: np.ndarray) -> bool:
        """`_evict_group` on the device where every stream is full and drops as many tokens as
        the others (the cache stays rectangular); False, having changed nothing, where they do
        not (snapkv's interval in a group: the host's ragged path)."""
        self.cache.to_device()  # (first, so the views below read the bookkeeping there)
        policies = cast(list[CachePolicy], self.group)
        drops = [
            _on_device(p.dropped(self.view(int(coming[b]), b, on_device=True)), self.device)
            for b, p in enumerate(policies)
        ]
        if len({d.shape[-1] for d in drops}) != 1:
            return False
        self._lanes |= np.array([d.dim() > 1 for d in drops])
        self._drop_on_device(drops)
        return True

    def _group_scores(self, ids: torch.Tensor, logits: torch.Tensor) -> np.ndarray | torch.Tensor | None:
        """A group's per-token scores: each scoring policy's for its own stream, 0 for the rest
        (on the device for a group stepping there)."""
        if not self._scorers:
            return None
        if self.device_steps:
            rows = torch.zeros(ids.shape, dtype=torch.float64, device=logits.device)
            for b, member in self._scorers:
                rows[b] = member.score_tokens_on_device(ids[b : b + 1], logits[b : b + 1])[0]
            return rows
        scores = np.zeros(ids.shape, dtype=np.float64)
        for b, member in self._scorers:
            scores[b] = member.score_tokens(ids[b : b + 1], logits[b : b + 1])[0]
        return scores

    def streams_kv(self) -> list[tuple[int, int]]:
        """(KV tokens, KV bytes) each stream of a group holds: what `kv_tokens` and `kv_bytes`
        would say were it run alone (one count of the lanes for all streams: a per-step call)."""
        cache = self.cache
        lanes = cache.lane_counts()  # (L, B, H)
        tokens, held = lanes.mean(axis=(0, 2)), lanes.sum(axis=(0, 2))
        per_lane, sliding = cache.lane_bytes(), cache.sliding_bytes() // self.batch
        return [(round(float(t)), int(h) * per_lane + sliding) for t, h in zip(tokens, held)]

    def _recall(self, incoming: int) -> None:
        retriever, tap = cast(RetrievalPolicy, self.policy), cast("QueryTap", self.tap)  # (policy.retrieves)
        self._recall_at = self.fed + retriever.refresh
        plan = retriever.recall(self.view(incoming), tap.query())
        if plan is not None:
            keep, at, positions, k_pre, values = plan
            self._hand_over(keep)
            self.cache.splice(keep, at, positions, k_pre, values)

    # ---- candidates: several continuations of the state now, in one forward ---------------------
    def branch_reason(self) -> str | None:
        """Why `score_branches` feeds candidates one forward each here (None: one tree forward)."""
        from streambench.engine.exact_chunks import unsupported

        if self.recomputes:
            return "it re-encodes a window instead of caching"
        if self.batch != 1:
            return "a tree runs one stream"
        # (an observer records nothing during a tree, as the rollback after a branch would
        # drop what it recorded; a hidden-state tap's rings are restored by the rollback)
        if self.tap is not None:
            return f"{self.policy.name} retrieves with the last query a forward leaves, which a tree's last reply would set"
        if self.quant is not None:
            return "a quantized cache reads a forward's own tokens in full precision"
        cache = self.cache
        if cache.sliding is not None or cache.ragged or cache.split:
            return "the cache has sliding layers or lanes of unequal counts"
        reason = unsupported(self.model)
        return f"this model cannot: {reason}" if reason else None

    @torch.no_grad()
    def score_branches(self, branches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The logits (1, len, vocab) of each branch (1, len) fed from the state now, each what
        `feed(branch)` then `rollback` gives; the state is left as it was. Where `branch_reason()`
        is None, all go in as one forward, a tree (engine/branches.py): every branch sees the held
        tokens and its own; the buffers grow for it and shrink back. The caller makes room first
        (`reserve`): no branch may need an eviction."""
        state = self.checkpoint()
        cache = self.cache
        longest = max(branch.shape[1] for branch in branches)
        if self.branch_reason() is not None or cache.length + longest > self._room:
            out, peak = [], (0, 0)
            for branch in branches:
                out.append(self.feed(branch))
                peak = max(peak, (self.kv_tokens, self.kv_bytes))
                self.rollback(state)
            self.branch_peak = peak
            return out
        # the most the cache held during the branches, as one at a time (no sliding layer, no pads)
        self.branch_peak = (cache.length + longest, (cache.length + longest) * self._token_bytes)
        from streambench.engine.branches import TreeMask

        lengths = [branch.shape[1] for branch in branches]
        n, capacity = cache.length, cache.capacity
        if n + sum(lengths) > capacity:  # room for the tree now, the run's buffers again after it
            cache.set_capacity(n + sum(lengths))
        try:
            ids = torch.cat(branches, dim=1)
            start = cache.next_positions(1)[0, 0]
            tree = TreeMask(self.model, n, lengths, self.device)
            positions = (start + tree.local.to(self.device))[None]
            self.processed += ids.shape[1]
            with tree, few_rows_linears(self._few_rows):
                logits = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
            if logits.device != self.device:
                logits = logits.to(self.device)
        finally:
            self.rollback(state)  # (nothing was committed: the written slots are dropped)
            if cache.capacity != capacity:
                cache.set_capacity(capacity)
        return list(logits.split(lengths, dim=1))

    # ---- kvpress's protocol: a context prefilled densely, compressed once --------------------------
    @contextmanager
    def unbounded(self) -> Iterator[StreamSession]:
        """Feeds inside the block evict nothing: the cache grows past the budget (kvpress prefills
        its context densely, then answers without evicting), and the hidden-state tap keeps every
        token's, for a press that scores the whole context. `compress` still evicts."""
        room, self._room = self._room, sys.maxsize
        if self.hidden is not None:
            self.hidden.growing = True
        try:
            yield self
        finally:
            self._room = room
            if self.hidden is not None:
                self.hidden.growing = False

    def compress(self, kept: int, reindex: bool | None = None) -> None:
        """Evict once, now, to `kept` tokens chosen by the policy (a view whose budget is `kept`,
        nothing incoming): kvpress's compress-once (`ScorerPress.compress` after its prefill).
        reindex=False, as kvpress: the kept keys keep their positions and the stream goes on at
        its own, and the cache evicts no more; True: positions become ranks, as streaming does
        (and as kvpress's KeyRerotationPress); None: as the policy declares."""
        if reindex is None:
            reindex = self.policy.compress_reindexes
        c = self.cache
        if not self.evicts:
            return  # (dense keeps everything)
        if c.length <= kept:
            return
        if self.batch != 1:
            raise ConfigError("compress-once runs one stream at a time (batch size 1)")
        keep = self._checked(self.view(0, budget=kept), 0, room=kept)
        self._hand_over(keep)
        c.evict(keep[None] if keep.ndim == 3 else keep, reindex=reindex)

    # ---- branches: score alternatives from one state, keep none of them -----------------------
    def reserve(self, count: int) -> None:
        """Evict now so that `count` more tokens fit without an eviction (SirLLM evicts once per
        turn, for the whole turn); feeds up to that many tokens can then be rolled back."""
        if self.evicts and self.max_incoming is not None:  # (evicting: always an int)
            if count > self.max_incoming:
                raise ConfigError(
                    f"{self.policy.name}: a turn of {count} tokens does not fit in budget {self.budget} "
                    f"(at most {self.max_incoming} tokens can come in at once); raise the budget"
                )
            if self.policy.retrieves:
                if self.fed >= self._recall_at:
                    self._recall(count)
                self._hold_until = self.fed + count  # no recall inside this turn's branches
            if self.cache.mean_length + count > self._room:
                self._evict(self._select(count))
        if self.cache.sliding is not None:
            self.cache.sliding.make_room(count)  # sliding layers compact now, not inside the branch

    def checkpoint(self) -> StreamState:
        """The stream's state now; `rollback` returns to it if nothing was evicted in between."""
        if self.group is not None:
            raise ConfigError("a group of policies streams without branches: checkpoint one policy at a time")
        cache = self.cache
        mark = None if cache is None else (cache.length, cache.epoch, cache.save_stats() if cache.stat_names else None)
        observed = self.observer.state() if self.observer is not None else None
        hidden = self.hidden.state() if self.hidden is not None else None
        return StreamState(self.fed, self.policy.state(), observed, mark, hidden=hidden)

    def rollback(self, state: StreamState) -> None:
        self.fed = state.fed
        self.policy.restore(state.policy)
        if self.observer is not None and state.observed is not None:
            self.observer.restore(state.observed)
        if self.hidden is not None and state.hidden is not None:
            self.hidden.restore(state.hidden)
        if state.cache_mark is not None:
            n, epoch, stats = state.cache_mark
            cache = self.cache
            if cache.epoch != epoch or cache.length < n:
                raise RuntimeError("cannot roll back across an eviction: reserve() room for the branch first")
            cache.truncate(n)
            if stats is not None:
                cache.restore_stats(stats)

    @contextmanager
    def fork(self) -> Iterator[StreamSession]:
        """A branch that may evict: everything fed inside the `with` block is forgotten afterwards,
        evictions included (a copy of the cache and the policy runs it). For questions the task
        asks on the side (grocery's free recall), where a rollback cannot reach across the
        eviction the branch needs. Costs one copy of the cache."""
        saved = _Branch(
            self.cache,
            self.policy,
            self.fed,
            self._recall_at,
            self._hold_until,
            self._branch_window(),
            self._static,
            self.observer.state() if self.observer is not None else None,
            self.tap.state() if self.tap is not None else None,
            self.hidden.state() if self.hidden is not None else None,
        )
        if self.cache is not None:
            self.cache = self.cache.clone()
        self.policy = copy.deepcopy(self.policy)
        self._static = None  # a captured graph writes into the stream's own buffers
        if self.observer is not None:
            self.observer.cache = self.cache
        self.fork_depth += 1
        try:
            yield self
        finally:
            self.fork_depth -= 1
            self.cache, self.policy, self.fed = saved.cache, saved.policy, saved.fed
            self._recall_at, self._hold_until, self._static = saved.recall_at, saved.hold_until, saved.static
            self._restore_window(saved.window)
            if self.observer is not None:
                self.observer.cache = self.cache
                self.observer.restore(saved.observed)
            if self.tap is not None and saved.tapped is not None:
                self.tap.restore(saved.tapped)
            if self.hidden is not None and saved.hidden is not None:
                self.hidden.restore(saved.hidden)

    def _branch_window(self) -> torch.Tensor | None:
        return None  # (RecomputeSession: its token window)

    def _restore_window(self, window: torch.Tensor | None) -> None:
        pass

    def drop_static_decoder(self) -> None:
        """Decode eagerly from now on (a model whose forward a CUDA graph cannot capture)."""
        self._static = None
        self.decode = "eager"

    def held_positions(self, stream: int = 0) -> np.ndarray:
        """Stream positions whose keys the next query reads: (n,), or (L, H_kv, n) once keep-sets
        differ per head. A group's stream: as it would be alone (its pads cut off)."""
        c = self.cache
        positions = c.positions_of(stream)
        if self.group is None:
            return positions
        if c.per_head and not self._lanes[stream]:
            positions = positions[0, 0]
        return positions[..., c.length - int(c.lane_counts()[0, stream, 0]) :]

    def new_round(self) -> None:
        """A new user turn: let the policy rescale stored scores (SirLLM's decay)."""
        if self.group is not None:
            for b, member in enumerate(self.group):
                self.cache.rescale_scores(member.new_round, stream=b)
        else:
            self.cache.rescale_scores(self.policy.new_round)
        self._recall_at = self.fed  # retrieval policies recall at each user turn

    def _select(self, incoming: int) -> np.ndarray:
        """Ranks to keep: (n,) for every stream alike, (B, n) per stream, or (B, L, H, n) per
        stream, layer and KV head; or a (B, L, H, n) bool keep mask where lanes keep unequal
        counts. Content-aware policies choose for each stream of a batch."""
        if self.batch == 1 or not self.policy.observes:  # position-based: one choice for every stream
            keep = self._checked(self.view(incoming), incoming)
            return np.broadcast_to(keep[None], (self.batch, *keep.shape)) if keep.ndim == 3 else keep
        keeps = [self._checked(self.view(incoming, b), incoming) for b in range(self.batch)]
        if any(k.dtype == bool for k in keeps):  # some stream keeps unequal counts: all as masks
            n = self.cache.length
            keeps = [k if k.dtype == bool else _as_mask(k, n) for k in keeps]
        elif len({k.shape for k in keeps}) != 1:
            raise PolicyContractError(f"policy {self.policy.name} kept different numbers of tokens in batched streams")
        return np.stack(keeps)

    def _evict_on_device(self, incoming: int) -> None:
        """`_select` then `_evict`, without leaving the device: each stream's policy names the
        ranks it drops (`dropped`), and the cache drops them in place."""
        self.cache.to_device()  # (first, so the views below read the bookkeeping there)
        self._drop_on_device(
            [
                _on_device(self.policy.dropped(self.view(incoming, b, on_device=True)), self.device)
                for b in range(self.batch)
            ]
        )

    def _drop_on_device(self, drops: list[torch.Tensor]) -> None:
        """Each stream's dropped ranks ((L, H, k) or (L, k) per lane, (k,) for the whole stream)
        as the cache takes them: one row per stream while every lane keeps alike, else one per
        (layer, stream, head) lane in the buffers' order."""
        c = self.cache
        self.device_evictions += 1
        if not c.per_head and all(d.dim() == 1 for d in drops):
            c.evict_on_device(torch.stack(drops))
            return
        layers, heads = c.num_layers, c.kv_heads
        lanes = [d.view(1, 1, -1) if d.dim() == 1 else d[:, None] if d.dim() == 2 else d for d in drops]
        stacked = torch.stack([d.expand(layers, heads, d.shape[-1]) for d in lanes], 1)
        c.evict_on_device(stacked.reshape(layers * self.batch * heads, -1))

    def _checked(self, view: CacheView, incoming: int, room: int | None = None, stream: int = 0) -> np.ndarray:
        """The policy's keep-set for `view`, held to the contract at the run's budget (or `room`:
        compress-once's), the pads of a ragged cache and the lane limits it declares. A group:
        the policy of stream `stream`."""
        c = self.cache
        policy = self.policy if self.group is None else self.group[stream]
        keep = policy.select(view)
        # (no pads to keep out of a keep-set otherwise; a group's stream sees none: _without_pads)
        valid = view.valid if c.ragged and self.group is None else None
        limits = policy.lane_limits(view) if policy.uneven else None
        room = self._room if room is None else room
        return checked_keep(policy, keep, room, incoming, view.length, c.num_layers, c.kv_heads, valid, limits)

    def view(self, incoming: int, stream: int = 0, budget: int | None = None, on_device: bool = False) -> CacheView:
        """What stream `stream`'s policy decides on. on_device: positions and scores as device
        tensors (a device step: the policy reads neither, `CachePolicy.device_select`)."""
        c = self.cache
        positions: Any
        scores: Any
        if on_device:
            positions, scores = c.device_positions(stream), c.device_scores(stream)
            if self.group is not None and c.per_head and not self._lanes[stream]:
                positions, scores = positions[0, 0], scores[0, 0]  # (its lanes hold alike)
        else:
            positions, scores = c.positions_of(stream), c.scores_of(stream)
            if self.group is not None and c.per_head and not self._lanes[stream]:
                positions, scores = positions[0, 0], scores[0, 0]  # (its lanes hold alike)
            positions.flags.writeable = scores.flags.writeable = False  # views: a policy only reads
        observed: dict[str, Any] = {}
        policy = self.policy if self.group is None else self.group[stream]
        for name in policy.observes:
            if name in c.stat_names:
                observed[name] = c.ranked_stat(name, stream)
            elif name == "window_attention" and self.observer is not None:
                observed[name] = self.observer.window_attention(stream)
            elif name in ("keys", "held_keys"):
                observed[name] = self._ranked_keys(stream, held=name == "held_keys")
            elif name == "key_shape":
                shape = (c.num_layers, c.kv_heads, c.length, c.head_dim)
                observed[name] = torch.zeros((), dtype=c.dtype, device=c.device).expand(shape)
            elif name == "values":
                observed[name] = c.ranked_values(stream)
            elif name == "hidden_states" and self.hidden is not None:
                observed[name] = self.hidden.last(stream)
            elif name == "attention_modules":
                observed[name] = self._attention_modules
        room = self._room if budget is None else budget
        return CacheView(c.length, incoming, room, positions, scores, observed, c.num_layers, c.kv_heads)

    def _ranked_keys(self, stream: int, held: bool):
        """Kept keys in rank order: at ranks 0..n-1, as a prefill of exactly the kept tokens holds
        them, or `held`: as the cache holds them, (keys at rank + offset, offset), which spares a
        policy whose scores only see relative positions a pass over every key."""
        c = self.cache
        rope = c.reindexing()
        if c.frozen:  # (kept at the positions they were fed at: rotated afresh at their ranks)
            pre = c.ranked_pre_keys(stream)
            keys = rope.rotate(pre, torch.arange(c.length, device=pre.device))
            return (keys, 0) if held else keys
        keys, offset = c.ranked_keys(stream), c.offset_of(stream)
        return (keys, offset) if held else rope.shift(keys, -offset)

    # ---- accounting --------------------------------------------------------------------------
    @property
    def kv_tokens(self) -> int:
        """Tokens whose keys and values attention reads for the next query (excluding it): per
        lane, on average over lanes where they keep unequal counts (rounded)."""
        cache = self.cache
        return cache.length if not cache.ragged else round(cache.mean_length)

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values the next query reads (logical): the tokens each lane of the
        governed (full-attention) layers keeps, summed over lanes, plus, on hybrid models, the
        sliding layers' windows."""
        return self.cache.kv_bytes() if self.cache.ragged or self.quant is not None else self.physical_kv_bytes

    @property
    def physical_kv_bytes(self) -> int:
        """Bytes the cache holds for the next query's attention: every layer at the slots it
        holds (lanes keeping unequal counts pad to their layer's longest), plus the sliding windows."""
        if self.cache.split or self.quant is not None:
            return self.cache.physical_kv_bytes()
        return self.cache.length * self._token_bytes + self.cache.sliding_bytes()

    def layer_accounting(self) -> dict | None:
        """Hybrid models: what each layer kind holds and why it is exact (None without sliding
        layers): the policy's budget governs the full-attention layers; sliding ones keep the
        model's own window."""
        if self.cache.sliding is None:
            return None
        slide = self.cache.sliding
        return {
            "full_attention": {
                "layers": self.cache.num_layers,
                "budget": self.budget,
                "policy": self.policy.name,
                "bytes_per_token": self._token_bytes,
                "exact": "equals the reference rebuilt from the kept tokens (tests/engine/test_exactness.py, tests/engine/test_hybrid.py)",
            },
            "sliding_attention": {
                "layers": len(slide.devices),
                "window": slide.window,
                "tokens_held": slide.window - 1,
                "bytes_per_token": slide.token_bytes(),
                "exact": "the model's own sliding cache: last window - 1 tokens at their stream distances",
            },
        }

    @property
    def sliding_tokens(self) -> int:
        """Tokens each sliding-window layer holds (0 without such layers)."""
        return self.cache.sliding.visible if self.cache.sliding is not None else 0

    @property
    def allocated_kv_bytes(self) -> int:
        return self.cache.allocated_bytes()
