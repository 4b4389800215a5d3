"""Ragged streams: a group session's streams fed chunks of their own lengths in one forward.

Dialogue tasks batch their conversations (grocery episodes, RPS players, DailyDialog dialogues)
as a group of copies of one policy, a stream each (session.py `group`). Their turns differ in
length, so one forward carries each feeding stream's chunk right-padded to the longest (a stream
with nothing to feed is not a row of it: `StreamCache.rows`): a stream's own tokens come first in
its row, so the causal mask already hides the pads from them; the pads are
written, committed, and dropped at once by a keep mask (the cache's ragged lanes: a lane keeping
fewer tokens holds pads at its first ranks, masked out of attention, eviction.py). The drop moves
a stream's tokens by one common rank shift, which its rotation offset absorbs: no key is
re-rotated. Each stream evicts when it would alone (its own count and incoming tokens), chooses
by its own policy from the view it would have alone, and scores its own tokens only: what a
stream computes is what it computes alone, up to the float noise of a wider matmul.

Branches (candidate replies) are forwards that commit nothing: written, read, truncated.
Checkpoints are snapshots of the whole batch (the cache cloned, the policies copied): a
dialogue takes one per side question, not per token.

Who runs a stream's turns one at a time and meets the others at these batched calls:
engine/lanes.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from streambench.engine.routing import AttentionRoute, register
from streambench.models.few_rows import few_rows_linears

if TYPE_CHECKING:
    from streambench.engine.cache import StreamCache
    from streambench.engine.cache.quant import KVQuant
    from streambench.engine.observe import AttentionObserver
    from streambench.policies.base import CachePolicy

NAME = "streambench_ragged"
_STATS = frozenset({"attention_sum", "attention_last"})  # recorded per query by the observer
_QUERIES = frozenset({"queries"})  # SnapKV's ring of the last queries: each stream writes its own
_ACTIVE: list[RaggedMask] = []


def ragged_refusal(policy: CachePolicy, quant: KVQuant | None = None, model: Any = None) -> str | None:
    """Why `policy` runs a dialogue task's conversations one at a time rather than as ragged
    streams of one batch (None: they batch)."""
    from streambench.engine.exact_chunks import unsupported
    from streambench.engine.session import ungroupable

    why = ungroupable(policy) or policy.batch_sensitive
    if why:
        return why
    if quant is not None and quant.quantized:
        return "a quantized cache feeds its streams token by token"
    reason = unsupported(model) if model is not None else None
    return f"this model cannot: {reason}" if reason else None


class RaggedMask(AttentionRoute):
    """The mask of one ragged forward: each stream's row sees the keys its lanes hold (a ragged
    cache's pads hidden) and, of the forward's own tokens, what `own` (B, width, width) shows
    (causal over its chunk, or a tree of branches); a pad query sees itself only."""

    def __init__(
        self,
        model,
        cache,
        own: torch.Tensor,
        observer=None,
        counts: list[int] | None = None,
        streams: torch.Tensor | None = None,
        active: list[int] | None = None,
    ):
        register(NAME, ragged_attention)
        super().__init__(model, NAME, _ACTIVE)
        # streams: the batch's rows this forward carries (own and counts are theirs), None: all;
        # active: the same as a list (the stream of each row)
        self.cache, self.own, self.streams = cache, own, streams
        self.active = active if active is not None else list(range(own.shape[0]))
        # recording attention statistics (h2o's sums, tova's last row) for the committed tokens:
        # each stream's first counts[b] queries, never a pad's
        self.observer, self.counts = observer, counts
        if observer is not None and counts is not None:
            width = own.shape[-1]
            self.valid = (torch.arange(width)[None] < torch.tensor(counts)[:, None]).to(own.device)
            self.last = torch.tensor([max(c - 1, 0) for c in counts], device=own.device)

    def whole(self, stats: torch.Tensor) -> torch.Tensor:
        """A statistic of the carried streams (A, ...) as the batch's (B, ...): 0 for a stream
        this forward does not carry (what its pad queries would add; its last row is restored)."""
        if self.streams is None:
            return stats
        out = stats.new_zeros((self.cache.batch, *stats.shape[1:]))
        return out.index_copy_(0, self.streams.to(stats.device), stats)

    def rows(self, layer: int, keys: int, groups: int) -> torch.Tensor:
        """(B, H_kv, groups * width, keys) bool for model layer `layer` (its query heads of a KV
        head as one block of rows, as `ragged_attention` lays them out)."""
        cache, own = self.cache, self.own
        batch, width = own.shape[0], own.shape[-1]
        held = keys - width
        allowed = cache.allowed_keys(int(cache.full_index[layer]), held) if cache.ragged else None
        if allowed is not None and self.streams is not None:
            allowed = allowed.index_select(0, self.streams.to(allowed.device))
        if allowed is None:
            allowed = torch.ones((batch, cache.kv_heads, held), dtype=torch.bool, device=own.device)
        rows = torch.cat(
            [
                allowed.to(own.device)[:, :, None, :].expand(-1, -1, width, -1),
                own[:, None].expand(-1, cache.kv_heads, -1, -1),
            ],
            dim=-1,
        )
        return rows if groups == 1 else rows.repeat(1, 1, groups, 1)


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """An attention function for `AttentionInterface`: SDPA under a ragged forward's mask."""
    route = _ACTIVE[-1]
    b, heads, c, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    observer = route.observer
    if observer is not None and route.counts is not None and "queries" in observer.wants:
        observer.record_streams(module.layer_idx, query, route.counts, route.active)
    if observer is not None and observer.wants & _STATS:
        return _observed(route, module, query, key, value, scaling, softcap)
    q = query.reshape(b, kv_heads, groups * c, d)  # each KV head's query heads as one block (no repeated keys)
    mask = route.rows(module.layer_idx, key.shape[-2], groups).to(query.device)
    out = F.scaled_dot_product_attention(
        q, key, value, attn_mask=mask, scale=scaling if scaling is not None else d**-0.5
    )
    return out.view(b, heads, c, -1).transpose(1, 2).contiguous(), None


def _observed(route: RaggedMask, module, query, key, value, scaling, softcap):
    """Eager attention under the ragged mask (observe.py's arithmetic), recording what the
    observer asks for over each stream's own queries: a pad's row adds nothing, and a stream
    that fed nothing keeps its last query's row (restored after the flush, `_forward_streams`)."""
    from streambench.engine.observe import attention_probs

    b, heads, c, d = query.shape
    kv_heads, n = value.shape[1], value.shape[-2]
    mask = route.rows(module.layer_idx, key.shape[-2], 1).to(query.device)  # (B, H_kv, c, n)
    probs = attention_probs(module, query, key, mask, scaling, softcap)  # (B, H_kv, groups, c, n)
    weights = probs.to(value.dtype).reshape(b * kv_heads, (heads // kv_heads) * c, n)
    out = torch.bmm(weights, value.reshape(b * kv_heads, n, -1)).view(b, heads, c, -1)
    if route.counts is not None:
        observer, cache = route.observer, route.cache
        layer = int(cache.full_index[module.layer_idx])
        if layer >= 0:
            pending = observer._pending
            if "attention_sum" in pending:
                kept = probs * route.valid[:, None, None, :, None].to(probs.dtype)
                pending["attention_sum"][layer] = route.whole(kept.sum(dim=3).mean(dim=2))
            if "attention_last" in pending:
                at = route.last.to(probs.device)[:, None, None, None, None].expand(-1, kv_heads, probs.shape[2], 1, n)
                pending["attention_last"][layer] = route.whole(probs.gather(3, at)[:, :, :, 0].mean(dim=2))
    return out.transpose(1, 2).contiguous(), None


def causal_rows(counts: list[int], width: int, device) -> torch.Tensor:
    """(B, width, width): each stream's chunk causal over its own tokens, each pad seeing itself."""
    eye = torch.eye(width, dtype=torch.bool)
    own = torch.ones(width, width, dtype=torch.bool).tril()
    rows = torch.stack([torch.where(torch.arange(width)[:, None] < c, own, eye) for c in counts])
    return rows.to(device)


def tree_rows(branches: list[list[torch.Tensor] | None], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each stream's branches as one tree (engine/branches.py): (B, width, width) rows and the
    (B, width) index of each token within its branch (its position past the stream's end)."""
    rows = torch.eye(width, dtype=torch.bool).repeat(len(branches), 1, 1)
    local = torch.zeros(len(branches), width, dtype=torch.long)
    for b, parts in enumerate(branches):
        at = 0
        for part in parts or ():
            n = int(part.shape[1])
            rows[b, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            local[b, at : at + n] = torch.arange(n)
            at += n
    return rows, local


@dataclass(frozen=True)
class Snapshot:
    """The whole batch as it was (for a side question asked in every stream at once)."""

    cache: Any
    group: list
    fed: np.ndarray
    observed: Any = None  # the observer's ring of queries (SnapKV's), where it keeps one


class RaggedFeeding:
    """The ragged calls of a group session (a mixin of StreamSession)."""

    # provided by StreamSession
    group: list[CachePolicy] | None
    policy: CachePolicy
    batch: int
    cache: StreamCache
    observer: AttentionObserver | None
    model: Any
    _few_rows: str | None
    device: torch.device
    processed: int
    stream_fed: np.ndarray
    evicts: bool
    budget: int | None
    max_incoming: int | None
    _room: int
    _scorers: list[tuple[int, CachePolicy]]
    _lanes: np.ndarray

    device_steps: bool

    if TYPE_CHECKING:  # (StreamSession's own methods, which these call)

        def _evict_group(self, incoming: int | np.ndarray) -> None: ...

        def _evict(self, keep: np.ndarray) -> None: ...

        def reset(self) -> None: ...

    def _ragged(self) -> None:
        if self.group is None:
            raise RuntimeError("ragged feeding needs a group session (a policy per stream)")
        # (streams evict at their own times: the host bookkeeping's ragged path, every turn)
        self.device_steps = False

    def reserve_streams(self, counts: list[int]) -> None:
        """`reserve` per stream: each stream whose held tokens and `counts[b]` would pass the
        budget evicts now, by its own policy (streams asking 0 keep what they hold)."""
        self._ragged()
        incoming = np.asarray(counts, dtype=np.int64)
        if self.evicts and self.max_incoming is not None:
            longest = int(incoming.max(initial=0))
            if longest > self.max_incoming:
                from streambench.errors import ConfigError

                raise ConfigError(
                    f"{self.policy.name}: a turn of {longest} tokens does not fit in budget {self.budget} "
                    f"(at most {self.max_incoming} tokens can come in at once); raise the budget"
                )
            self._evict_group(incoming)

    @torch.no_grad()
    def feed_streams(self, chunks: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Feed stream b the ids `chunks[b]` (1, c_b) (None or empty: nothing this time) in one
        forward; return each stream's logits (1, c_b, vocab), as `feed` gives it alone."""
        self._ragged()
        counts = [0 if c is None else int(c.shape[1]) for c in chunks]
        limit = self.max_incoming
        if limit is not None and max(counts) > limit:  # alone: pieces of `limit`, at the same bounds
            pieces = [
                self.feed_streams([None if c is None or c.shape[1] <= i else c[:, i : i + limit] for c in chunks])
                for i in range(0, max(counts), limit)
            ]
            return [
                None if counts[b] == 0 else torch.cat([t for p in pieces if (t := p[b]) is not None], dim=1)
                for b in range(self.batch)
            ]
        if max(counts) == 0:
            return [None] * self.batch
        incoming = np.asarray(counts, dtype=np.int64)
        self._evict_group(incoming)
        cache = self.cache
        n, width = cache.length, max(counts)
        held = cache.lane_counts()[0, :, 0] if cache.ragged else np.full(self.batch, n)
        logits, row = self._forward_streams(chunks, counts, width, causal_rows(counts, width, self.device))
        scores = None
        if self._scorers:
            scores = np.zeros((self.batch, width), dtype=np.float64)
            for b, member in self._scorers:
                c = counts[b]
                if c:  # (its own tokens only: a scorer carrying state from its last token sees no pad)
                    ids = chunks[b]
                    scores[b, :c] = member.score_tokens(ids, logits[row[b] : row[b] + 1, :c])[0]
        fed = self.stream_fed
        positions = np.full((self.batch, width), -1, dtype=np.int64)
        for b, c in enumerate(counts):
            positions[b, :c] = np.arange(fed[b], fed[b] + c)
        cache.commit(positions, scores)
        fed += incoming
        self.processed += int(incoming.sum())
        if min(counts) < width:  # drop the pads: each stream keeps what it held and its own tokens
            keeps = [np.arange(n - int(held[b]), n + counts[b]) for b in range(self.batch)]
            from streambench.engine.session import join_keeps

            evictions = cache.evictions
            self._evict(join_keeps(keeps, n + width, cache.num_layers, cache.kv_heads))
            cache.evictions = evictions  # (pads are not tokens: no eviction to count)
        return [logits[row[b] : row[b] + 1, :c] if c else None for b, c in enumerate(counts)]

    def _forward_streams(
        self, chunks, counts: list[int], width: int, own: torch.Tensor, local: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[int, int]]:
        """One forward of the chunks of the streams that feed (counts[b] > 0), each right-padded
        to `width`, under the ragged mask `own` shows of the forward's tokens; their logits
        (A, width, vocab) and each such stream's row in them. A stream that feeds nothing is not
        carried: its row costs nothing (its slots of this forward stay unwritten, pads dropped
        after). `local`: each token's position past its stream's end (a tree's), else its index
        in the chunk."""
        active = [b for b, c in enumerate(counts) if c]
        ids = torch.zeros((len(active), width), dtype=torch.long, device=self.device)
        for j, b in enumerate(active):
            ids[j, : counts[b]] = chunks[b][0]
        cache = self.cache
        every = positions = cache.next_positions(width)
        if local is not None:
            positions = positions[:, :1] + local.to(positions.device)
        streams = None
        if len(active) < self.batch:
            streams = torch.tensor(active, dtype=torch.long, device=self.device)
            positions, own = positions[streams], own[streams]
        observer = self.observer if self.observer is not None and self.observer.wants & (_STATS | _QUERIES) else None
        # (branches commit nothing: observed as alone's rolled-back forward, their statistics dropped)
        counts_seen = [counts[b] for b in active] if local is None else None
        idle = [b for b, c in enumerate(counts) if c == 0]
        last = None
        if observer is not None and counts_seen is not None and idle and "attention_last" in observer.wants:
            last = [shard.stats["attention_last"][:, idle].clone() for shard in cache.shards]
        cache.rows = streams
        try:
            with (
                RaggedMask(self.model, cache, own, observer, counts_seen, streams, active),
                few_rows_linears("few" if self._few_rows else None),  # (turns: never exact)
            ):
                logits = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
        finally:
            cache.rows = None
        if observer is not None and counts_seen is not None:
            observer.positions = None  # (the ring's positions: each stream's own, below)
            observer.flush(width)
            observer.flush_streams(counts, every)
            for shard, rows in zip(cache.shards, last or ()):  # (a stream that fed nothing: its last query's)
                shard.stats["attention_last"][:, idle, :, : rows.shape[-1]] = rows
        logits = logits.to(self.device) if logits.device != self.device else logits
        return logits, {b: j for j, b in enumerate(active)}

    @torch.no_grad()
    def branches_streams(self, branches: list[list[torch.Tensor] | None]) -> list[list[torch.Tensor]]:
        """`score_branches` per stream: the logits of each of stream b's branches (1, len) fed from
        the state now, the state left as it was. Every stream's branches go in one forward, a tree
        per stream (engine/branches.py), that commits nothing (its slots are dropped after); the
        caller reserved room for the longest."""
        self._ragged()
        lengths = [[int(part.shape[1]) for part in parts or ()] for parts in branches]
        counts = [sum(parts) for parts in lengths]
        width = max(counts, default=0)
        if width == 0:
            return [[] for _ in range(self.batch)]
        cache = self.cache
        n = cache.length
        held = cache.lane_counts()[0, :, 0] if cache.ragged else np.full(self.batch, n)
        if np.any(held + np.asarray([max(parts, default=0) for parts in lengths]) > self._room):
            raise RuntimeError("a branch needs room the caller did not reserve")
        chunks: list[torch.Tensor | None] = [torch.cat(list(parts), dim=1) if parts else None for parts in branches]
        rows, local = tree_rows(branches, width)
        self.processed += sum(counts)
        if n + width > cache.capacity and not cache.split:  # room for the tree now, the run's buffers after it
            capacity = cache.capacity
            cache.set_capacity(n + width)
        else:
            capacity = None
        try:
            logits, row = self._forward_streams(chunks, counts, width, rows.to(self.device), local)
        finally:
            cache.truncate(n)
            if capacity is not None:
                cache.set_capacity(capacity)
        return [
            list(logits[row[b] : row[b] + 1, : counts[b]].split(lengths[b], dim=1)) if counts[b] else []
            for b in range(self.batch)
        ]

    def reset_streams(self, streams: list[int]) -> None:
        """Start `streams` afresh (a new conversation each) while the others go on: their tokens
        leave the cache (their lanes hold pads until they feed again), their policies and
        positions start over. Every stream at once: `reset`."""
        self._ragged()
        if len(set(streams)) == self.batch:
            self.reset()
            return
        from streambench.engine.session import join_keeps

        cache = self.cache
        n = cache.length
        held = cache.lane_counts()[0, :, 0] if cache.ragged else np.full(self.batch, n)
        keeps = [
            np.zeros(0, dtype=np.int64) if b in streams else np.arange(n - int(held[b]), n) for b in range(self.batch)
        ]
        if n:
            self._evict(join_keeps(keeps, n, cache.num_layers, cache.kv_heads))
        group = self.group or []
        if self.observer is not None:
            self.observer.restart_streams(streams, self.batch)
        for b in streams:
            group[b].reset()
            self.stream_fed[b] = 0
            self._lanes[b] = False  # (one keep-set for all its lanes again, until its policy chooses per head)

    def snapshot(self) -> Snapshot:
        """The batch now: its cache cloned, its policies copied (`restore` returns to it)."""
        self._ragged()
        observed = self.observer.state() if self.observer is not None else None
        return Snapshot(self.cache.clone(), copy.deepcopy(list(self.group or ())), self.stream_fed.copy(), observed)

    def restore(self, snapshot: Snapshot, keep: bool = False) -> None:
        """Back to `snapshot` (keep=True: it stays usable for another restore)."""
        cache = snapshot.cache.clone() if keep else snapshot.cache
        group = copy.deepcopy(snapshot.group) if keep else snapshot.group
        self.cache, self.group, self.policy = cache, list(group), group[0]
        self._scorers = [(b, p) for b, p in enumerate(group) if "logits" in p.observes]
        self.stream_fed = snapshot.fed.copy()
        if self.observer is not None:
            self.observer.cache = cache
            if snapshot.observed is not None:
                self.observer.restore(snapshot.observed)
