"""What content-aware policies read, recorded during the forward that runs anyway.

SDPA does not return attention probabilities, and asking transformers for them (`eager`,
`output_attentions`) materialises every layer's full matrix. Instead, while a session whose policy
observes attention feeds, the model's attention runs through `observing_attention`, registered with
transformers' `AttentionInterface`: it computes the softmax probabilities once from the query and
cached keys the layer passes in (eager attention's arithmetic: scaled scores, the model's mask,
softcapping, a float32 softmax), uses them for the layer's output, and reduces them into the
cache's per-slot statistics before they are dropped:

- `attention_sum`  every query's attention to each cached token since the token entered the cache
                   (H2O's accumulated score), averaged over the query heads of each KV group;
- `attention_last` the attention of the most recent query (TOVA's score), likewise per KV head;
- `queries`        the queries of the last `window` tokens per layer (a ring written in place,
                   with their RoPE positions), from which `window_attention` recomputes, at
                   eviction, what that window attends to in the cache as it is then (SnapKV's
                   observation window). Un-rotating them waits for that eviction: once per
                   eviction for all layers, not once per layer per token.

`key_norm` needs no capture: the cache records each key's L2 norm when the token enters.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch

from streambench.engine.routing import AttentionRoute, register
from streambench.errors import ConfigError
from streambench.policies.base import OBSERVATIONS

NAME = "streambench_observing"
CAPTURED = frozenset({"attention_sum", "attention_last", "queries", "window_attention"})  # need the attention hook
STATS = frozenset({"attention_sum", "attention_last", "key_norm"})  # per-slot buffers in the cache
# made in Python during the forward (the attention route, module hooks): a replayed CUDA graph skips them
EAGER_ONLY = CAPTURED | {"hidden_states"}
KINDS = OBSERVATIONS  # what a policy may declare in `observes` (policies/base.py)
_ACTIVE: list[AttentionObserver] = []  # the observer of the forward running now (innermost last)


def attention_probs(module, query, key, mask, scaling=None, softcap=None, allowed=None) -> torch.Tensor:
    """Softmax attention (B, H_kv, groups, c, N) as eager attention computes it, float32. One
    batched matmul per layer: each KV head's group of query heads is one (groups * c, D) block.
    `allowed` (B, H_kv, N) bool: False at a ragged cache's pad slots (never attended)."""
    b, heads, c, d = query.shape
    kv_heads, n = key.shape[1], key.shape[-2]
    scale = scaling if scaling is not None else 1 / math.sqrt(d)
    q = query.float().reshape(b * kv_heads, (heads // kv_heads) * c, d)
    scores = torch.baddbmm(
        q.new_empty(()), q, key.float().reshape(b * kv_heads, n, d).transpose(1, 2), beta=0, alpha=scale
    )
    scores = scores.view(b, kv_heads, heads // kv_heads, c, n)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        if c > 1:  # causal, the chunk's queries at the end of the keys
            causal = torch.ones(c, n, dtype=torch.bool, device=query.device).tril(n - c)
            scores = scores.masked_fill(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[:, :, None, :, :n], float("-inf"))
    else:
        scores = scores + mask[:, :, None, :, :n].float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, :, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def observing_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """An attention function for `AttentionInterface`: eager attention that also records.
    (dropout before scaling, as transformers' sdpa_attention_forward: kvpress's attention patch,
    applied when something imports kvpress directly, passes dropout by position.)"""
    if kwargs.get("s_aux") is not None:
        raise ConfigError("this model's attention has learned sinks (s_aux): attention observations do not support it")
    allowed = _ACTIVE[-1].allowed(module.layer_idx, key.shape[-2]) if _ACTIVE else None
    if allowed is not None and attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
        # a ragged cache's layer holding fewer slots than the stream's ranks: its old keys are
        # all visible, the new ones sit at its end as at the mask's
        attention_mask = attention_mask[..., attention_mask.shape[-1] - key.shape[-2] :]
    probs = attention_probs(module, query, key, attention_mask, scaling, softcap, allowed)
    b, heads, c, d = query.shape
    kv_heads, n = value.shape[1], value.shape[-2]
    weights = probs.to(value.dtype).reshape(b * kv_heads, (heads // kv_heads) * c, n)
    out = torch.bmm(weights, value.reshape(b * kv_heads, n, -1)).view(b, heads, c, -1)
    out = out.transpose(1, 2).contiguous()
    if _ACTIVE:
        observer = _ACTIVE[-1]
        if observer.exact_rows and observer.plain_rows:  # (no dict per layer where every stream observes)
            extra = {**kwargs, "scaling": scaling, "dropout": dropout}
            if softcap is not None:  # (the model's own function takes softcap only where the model passes it)
                extra["softcap"] = softcap
            _as_alone(observer, module, query, key, value, attention_mask, out, allowed is not None, extra)
        observer.record(module.layer_idx, query, probs)  # (a sliding layer's are not the cache's: skipped)
    return out, None


def _as_alone(observer, module, query, key, value, mask, out, ragged: bool, kwargs: dict) -> None:
    """A bitwise group's attention (models/few_rows.py): a stream whose policy alone observes
    nothing takes the model's own attention function, in place in `out`, one stream per call
    (SDPA's kernel tiles a batch: two rows give other bits than one). Not a stream holding fewer
    tokens than another (snapkv's interval): its keys sit in other slots than alone (eviction.py
    fills holes with pads), so its attention sums in another order whatever runs it, and it keeps
    the masked row (float-close to alone)."""
    padded = observer.padded_streams(module.layer_idx) if ragged else ()
    rows = [b for b in observer.plain_rows if b not in padded]
    plain = observer.plain_attention(module) if rows else None
    if plain is None:
        return
    for b in rows:
        m = mask if mask is None or mask.shape[0] == 1 else mask[b : b + 1]
        out[b : b + 1] = plain(module, query[b : b + 1], key[b : b + 1], value[b : b + 1], m, **kwargs)[0]


class AttentionObserver(AttentionRoute):
    """Routes one model's attention through `observing_attention` while a session feeds."""

    def __init__(self, model, cache, wants: frozenset, window: int = 0):
        register(NAME, observing_attention)
        self.cache, self.wants, self.window = cache, wants, window
        super().__init__(model, NAME, _ACTIVE)
        from streambench.models.architecture import layout_of

        layout = layout_of(model)
        self.scaling = [
            getattr(attn, "scaling", None)
            for attn, kind in zip(layout.attentions, layout.layer_kinds)
            if kind != "sliding_attention"
        ]
        self._scale: torch.Tensor | None = None  # per layer, on the cache's device (window_attention)
        # a group's rows whose policy alone runs the model's own attention, not this observing one:
        # their outputs come from that function (the same bits as alone; `plain_rows`)
        self.exact_rows = False
        self.plain_rows: list[int] = []
        self._plain: str | None = None
        self.positions: torch.Tensor | None = None  # (B, c) RoPE positions of the tokens being fed (the session)
        self._pending: dict[str, list[torch.Tensor | None]] = {
            name: [None] * cache.num_layers for name in ("attention_sum", "attention_last") if name in wants
        }
        self.reset()

    def set_exact_rows(self, plain_rows: list[int], implementation: str) -> None:
        """A bitwise group (models/few_rows.py): each stream's attention as alone (`_as_alone`);
        `plain_rows`, the streams that alone attend through the model's `implementation`."""
        self.exact_rows, self.plain_rows, self._plain = True, list(plain_rows), implementation

    def padded_streams(self, layer: int) -> set[int]:
        """The streams holding fewer tokens than the widest at model layer `layer` (pads)."""
        full = int(self.cache.full_index[layer])
        if full < 0:
            return set()
        return {int(b) for b in np.flatnonzero(self.cache.lane_pads()[full].any(axis=1))}

    def plain_attention(self, module):
        """The attention function the model runs alone (its `eager_attention_forward` for eager)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self._plain in ALL_ATTENTION_FUNCTIONS:
            return ALL_ATTENTION_FUNCTIONS[self._plain]
        import sys

        return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)

    def reset(self) -> None:
        layers = self.cache.num_layers
        self._ring: list[torch.Tensor | None] = [None] * layers  # per layer (B, H, w, D), as rotated
        self._ring_positions: torch.Tensor | None = None  # (B or 1, w): where each ring query was rotated
        self._seen = 0  # queries fed since the stream started (the ring's write position, mod w)
        # ragged streams (ragged.py) each feed their own counts: queries seen per stream, or None
        # while every stream has seen `_seen`
        self._stream_seen: np.ndarray | None = None
        self._shared = [False] * (layers + 1)  # copy on write: a checkpoint holds these buffers

    def state(self):
        """A checkpoint keeps references; the first write after it copies (dialogue branches)."""
        self._shared = [True] * len(self._shared)
        seen = None if self._stream_seen is None else self._stream_seen.copy()
        return self._seen, list(self._ring), self._ring_positions, seen

    def restore(self, state) -> None:
        self._seen, ring, self._ring_positions, seen = state
        self._stream_seen = None if seen is None else seen.copy()
        self._ring = list(ring)
        self._shared = [True] * len(self._shared)

    def seen_by(self, b: int) -> int:
        """Queries stream `b` has fed since it started."""
        return self._seen if self._stream_seen is None else int(self._stream_seen[b])

    def restart_streams(self, streams: list[int], batch: int) -> None:
        """Ragged streams starting afresh (a new conversation each): no query of theirs is seen."""
        if self._stream_seen is None:
            self._stream_seen = np.full(batch, self._seen, dtype=np.int64)
        self._stream_seen[streams] = 0

    @torch.no_grad()
    def record_streams(self, layer: int, query: torch.Tensor, counts: list[int], streams: list[int]) -> None:
        """A ragged forward's queries into the ring: row j is stream `streams[j]`, whose own
        `counts[j]` queries come first (pads after); each stream writes at its own position."""
        layer = int(self.cache.full_index[layer])
        if layer < 0 or "queries" not in self.wants:
            return
        batch = self.cache.batch
        ring = self._ring[layer]
        if ring is None:
            ring = query.new_zeros(batch, query.shape[1], self.window, query.shape[3])
        ring = self._ring[layer] = self._writable(layer, ring)
        for j, (b, c) in enumerate(zip(streams, counts)):
            take, slots = self._ring_slots(c, query.device, b)
            ring[b].index_copy_(1, slots, query[j, :, c - take : c])

    def flush_streams(self, counts: list[int], positions: torch.Tensor) -> None:
        """After a ragged forward: each stream's ring positions ((B, width) RoPE positions, its
        own first `counts[b]`) and queries seen."""
        if "queries" not in self.wants:
            return
        batch = len(counts)
        if self._stream_seen is None:
            self._stream_seen = np.full(batch, self._seen, dtype=np.int64)
        ring = self._ring_positions
        if ring is None or ring.shape[0] != batch:
            ring = positions.new_zeros(batch, self.window) if ring is None else ring.expand(batch, -1)
        ring = self._ring_positions = self._writable(-1, ring).contiguous()
        positions = positions.to(ring.device)
        for b, c in enumerate(counts):
            if c:
                take, slots = self._ring_slots(c, ring.device, b)
                ring[b].index_copy_(0, slots, positions[b, c - take : c])
        self._stream_seen += np.asarray(counts, dtype=np.int64)

    def _ring_slots(self, count: int, device, stream: int | None = None) -> tuple[int, torch.Tensor]:
        """The last min(count, w) of `count` new queries: how many, and their ring slots (of
        `stream`, a ragged stream at its own position)."""
        take = min(count, self.window)
        start = (self._seen if stream is None else self.seen_by(stream)) + count - take
        return take, torch.arange(start, start + take, device=device) % self.window

    def _writable(self, index: int, buf: torch.Tensor) -> torch.Tensor:
        if self._shared[index]:
            self._shared[index] = False
            return buf.clone()
        return buf

    def allowed(self, layer: int, n: int) -> torch.Tensor | None:
        """A ragged cache's pad mask for model layer `layer` (None: nothing to mask; a sliding
        layer holds its own window, never padded)."""
        if not self.cache.ragged:
            return None
        full = int(self.cache.full_index[layer])
        return None if full < 0 else self.cache.allowed_keys(full, n)

    @torch.no_grad()
    def record(self, layer: int, query: torch.Tensor, probs: torch.Tensor) -> None:
        """Called by each layer: reduce its probabilities to per-KV-head rows now (small), and
        write them into the cache's buffers once per forward (`flush`), not once per layer."""
        layer = int(self.cache.full_index[layer])  # model layer -> full-attention layer
        if layer < 0:
            return
        c = probs.shape[-2]
        if "attention_sum" in self.wants:  # over the chunk's queries, then the group: (B, H_kv, N)
            self._pending["attention_sum"][layer] = (probs[:, :, :, 0] if c == 1 else probs.sum(dim=3)).mean(dim=2)
        if "attention_last" in self.wants:
            self._pending["attention_last"][layer] = probs[..., -1, :].mean(dim=2)
        if "queries" in self.wants:
            ring = self._ring[layer]
            if ring is None:
                ring = query.new_zeros(query.shape[0], query.shape[1], self.window, query.shape[3])
            ring = self._ring[layer] = self._writable(layer, ring)
            take, slots = self._ring_slots(c, query.device)
            ring.index_copy_(2, slots, query[:, :, c - take :])

    @torch.no_grad()
    def flush(self, count: int) -> None:
        """After the forward that fed `count` tokens: add the accumulated attention to the kept
        tokens' sums, start the new tokens' at their own, overwrite the last query's."""
        for name, rows in self._pending.items():
            if rows[0] is None:
                continue
            for shard in self.cache.shards:
                got = torch.stack(cast(list[torch.Tensor], rows[shard.start : shard.stop])).to(
                    shard.device
                )  # (L_s, B, H_kv, N)
                buf, n = shard.stats[name], got.shape[-1]
                if name == "attention_sum":
                    old = n - count
                    buf[..., :old] += got[..., :old]
                    buf[..., old:n] = got[..., old:]
                else:
                    buf[..., :n] = got
            rows[:] = [None] * len(rows)
        if "queries" in self.wants and self.positions is not None:
            positions = self.positions.to(self.cache.device)
            ring = self._ring_positions
            if ring is None:
                ring = positions.new_zeros(positions.shape[0], self.window)
            ring = self._ring_positions = self._writable(-1, ring)
            take, slots = self._ring_slots(count, ring.device)
            ring.index_copy_(1, slots, positions[:, count - take :])
            self._seen += count
            if self._stream_seen is not None:
                self._stream_seen += count

    @torch.no_grad()
    def window_attention(self, b: int = 0) -> torch.Tensor | None:
        """(L, H_kv, groups, w, n): the softmax attention that the last w queries, rotated at the
        last w positions of the cache as it is now, give its tokens (in each head's rank order),
        causal within the window. None before any query was seen."""
        ring = [q for q in self._ring if q is not None]
        at = self._ring_positions
        seen = self.seen_by(b)
        if seen == 0 or len(ring) < len(self._ring) or at is None:
            return None
        cache = self.cache
        rope = cache.reindexing()
        n = cache.length
        # (a ragged cache: the stream's tokens are the last ranks of its lanes, pads before them)
        held = int(cache.lane_counts()[0, b, 0]) if cache.ragged and self._stream_seen is not None else n
        w = min(seen, self.window, held)
        slots = torch.arange(seen - w, seen, device=cache.device) % self.window  # the last w, oldest first
        queries = torch.stack([q[b].to(cache.device) for q in ring]).index_select(2, slots)  # (L, Hq, w, D)
        fed_at = at[b if at.shape[0] > 1 else 0].index_select(0, slots)
        now_at = torch.arange(n - w, n, device=cache.device) + cache.offset_of(b)
        q = rope.rotate(rope.unrotate(queries, fed_at), now_at).float()
        keys = cache.ranked_keys(b).float()  # (L, H, n, D)
        layers, heads, _, d = q.shape
        kv = keys.shape[1]
        if self._scale is None or self._scale.device != cache.device:  # (made once: not a copy per eviction)
            self._scale = torch.tensor(
                [s if s is not None else 1 / math.sqrt(d) for s in self.scaling], device=cache.device
            )
        scale = self._scale
        scores = torch.matmul(q.reshape(layers, kv, (heads // kv) * w, d), keys.transpose(-1, -2))
        scores = (scores * scale[:, None, None, None]).view(layers, kv, heads // kv, w, n)
        allowed = torch.ones(w, n, dtype=torch.bool, device=cache.device).tril(n - w)
        if cache.ragged:  # a lane's pads (its first ranks) are never attended
            pads = torch.from_numpy(cache.lane_counts()[:, b]).to(cache.device)  # (L, H) kept
            real = torch.arange(n, device=cache.device) >= (n - pads)[..., None]  # (L, H, n)
            allowed = allowed & real[:, :, None, None, :]
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
