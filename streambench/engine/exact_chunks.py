"""Token-exact chunked feeding for policies whose keep-set depends only on positions.

The StreamingLLM protocol (mit-han-lab/streaming-llm `examples/eval_long_ppl.py`) feeds one
token per forward. For dense, window and StreamingLLM, what token t attends to under that protocol
is known before any forward: the first `sinks` tokens and the `width` most recent ones (itself
included), the recent ones at their original distances (re-indexing keeps a contiguous block's
distances) and the sinks at the distance the re-indexed cache gives them, min(t, budget - 1) - i.
So a chunk of c tokens runs as one forward in which each query is restricted, by its own mask
row, to exactly those keys; every kept token's keys and values were themselves computed under the
same restriction, so every layer, and every token's NLL, equals token-by-token feeding.

The sinks are the only keys a query sees at a distance other than its original one. Inside the
forward, `exact_attention` (registered with transformers' `AttentionInterface`) gives each query a
second rotation, at the position from which the sinks sit at their re-indexed distance, and
scores the sink columns with it: one scaled-dot-product call over [q, q_sink] . [k | 0, 0 | k_sink]
(the sink keys in the second half of a doubled head dimension), so no per-query copies of keys.
Memory per layer is O(chunk x (budget + chunk)) for the mask, never O(stream).

The session (`StreamSession.feed(ids, exact=True)`) evicts before the chunk to the keep-set the
protocol holds before its first token, runs the chunk, and evicts after it to the keep-set the
protocol holds after its last: the cache then equals token-by-token feeding's, so any feed after
it (a decode probe, an lm-eval continuation) goes on from the same state.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from streambench.engine.routing import AttentionRoute, register
from streambench.policies.base import Band  # noqa: F401  (re-exported: the declaration this module serves)

NAME = "streambench_exact"
_ACTIVE: list[ChunkMask] = []


def unsupported(model) -> str | None:
    """Why this model cannot be fed in exact chunks (None: it can). A sliding-window mask would
    restrict the keys further than the band, and softcapping changes the scores SDPA computes:
    such models are fed token by token."""
    from streambench.models.architecture import layout_of

    if not layout_of(model).routable:
        return "its attention is computed outside transformers' AttentionInterface"
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return f"its attention has a sliding window ({window})"
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention softcaps logits"
    return None


class ChunkMask(AttentionRoute):
    """The restriction of one chunk, shared by every layer of its forward.

    slot_positions (N,): the stream position of the key in each physical cache slot (the chunk's
    own keys included); queries (c,): the chunk's stream positions; rotated_at (c,): the RoPE
    positions the model rotated the chunk's queries at; rope: the session's RotaryTable."""

    def __init__(
        self,
        model,
        band: Band,
        slot_positions: torch.Tensor,
        queries: torch.Tensor,
        rotated_at: torch.Tensor,
        rope=None,
        offset: int = 0,
    ):
        register(NAME, exact_attention)
        super().__init__(model, NAME, _ACTIVE)
        t = queries[:, None]
        keys = slot_positions[None, :]
        low = (
            torch.clamp(t - band.width + 1, min=band.sinks)
            if band.width is not None
            else torch.full_like(t, band.sinks)
        )
        recent = (keys >= low) & (keys <= t)
        self.sinks = None
        if band.sinks:
            is_sink = slot_positions < band.sinks
            self.mask = recent | (is_sink[None, :] & (keys <= t))
            if bool(is_sink.any()):
                self.sinks = is_sink[:, None]  # (N, 1): these keys move to the second half
                # the sinks of the re-indexed cache sit at ranks 0..S-1 (RoPE position rank + offset);
                # the query that sees them at distance min(t, budget - 1) - i sits at this position:
                budget = cast(int, band.budget)  # (a band with sinks belongs to an evicting policy)
                self.sink_query_at = torch.clamp(queries, max=budget - 1) + offset
                self.rotated_at, self.rope = rotated_at, rope
        else:
            self.mask = recent
        self._on: dict = {}

    def on(self, device, groups: int) -> tuple:
        """What every layer on `device` reads, built once per chunk (a model spread over GPUs has a
        copy per device): the mask with one row block per query head of a KV group, the sink flags
        and the two query positions."""
        key = (str(device), groups)
        if key not in self._on:
            mask = self.mask.to(device)
            rows = mask if groups == 1 else mask.repeat(groups, 1)
            if self.sinks is None:
                self._on[key] = (rows, None, None, None)
            else:
                self._on[key] = (rows, self.sinks.to(device), self.rotated_at.to(device), self.sink_query_at.to(device))
        return self._on[key]


def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """An attention function for `AttentionInterface`: SDPA under the chunk's own mask."""
    chunk = _ACTIVE[-1]
    b, heads, c, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    rows, sinks, rotated_at, sink_query_at = chunk.on(query.device, groups)
    if sinks is not None:
        # the sink columns are scored by the query rotated at `sink_query_at`; the others by the
        # query as the model rotated it. Doubling the head dimension does both in one call.
        rope = chunk.rope
        again = rope.rotate(rope.unrotate(query, rotated_at), sink_query_at)
        query = torch.cat((query, again), dim=-1)
        zero = key.new_zeros(())
        key = torch.cat((torch.where(sinks, zero, key), torch.where(sinks, key, zero)), dim=-1)
        # values padded to the same width: SDPA's fused CPU kernel needs equal widths (2.4x faster
        # than the unfused fallback at chunk 1024 here); the padding's output is dropped
        value = torch.cat((value, torch.zeros_like(value)), dim=-1)
    # each KV head's group of query heads as one block of groups * c rows (no repeated keys)
    q = query.reshape(b, kv_heads, groups * c, query.shape[-1])
    out = F.scaled_dot_product_attention(
        q, key, value, attn_mask=rows, scale=scaling if scaling is not None else d**-0.5
    )
    out = out.view(b, heads, c, -1)
    if sinks is not None:
        out = out[..., : value.shape[-1] // 2]
    return out.transpose(1, 2).contiguous(), None


def recompute_rows(model, context: torch.Tensor, first: int, size: int, tokens_per_forward: int = 4096) -> torch.Tensor:
    """Recompute-window's logits, batched: for each position p >= first of `context` (B, T), the
    last-token logits of a fresh forward over the window context[p - size + 1 : p + 1] (or the
    whole prefix when shorter, which is one causal forward). Windows are rows of one forward,
    `tokens_per_forward // size` at a time. Returns (B, T - first, vocab)."""
    batch, total = context.shape
    outs = []
    early_end = min(total, size)  # windows that start at 0 are prefixes: one causal forward
    if first < early_end:
        logits = model(input_ids=context[:, :early_end], use_cache=False).logits
        outs.append(logits[:, first:early_end])
    start = max(first, early_end)
    if start < total:
        windows = context.unfold(1, size, 1)[:, start - size + 1 :]  # (B, total - start, size)
        count = windows.shape[1]
        step = max(1, tokens_per_forward // (size * batch))
        for i in range(0, count, step):
            rows = windows[:, i : i + step].reshape(-1, size)
            logits = model(input_ids=rows, use_cache=False, logits_to_keep=1).logits
            outs.append(logits.view(batch, -1, logits.shape[-1]))
    return torch.cat(outs, dim=1)


def auto_chunk(budget: int | None, device, heads: int = 1) -> int:
    """Tokens per exact forward when the run names none: the budget (each query then sees at most
    2 x budget keys, twice the protocol's attention work, for one forward per budget tokens),
    within [64, 1024] on CPU; on GPU as large as keeps the masked scores of one layer near 256 MiB."""
    base = 512 if budget is None else budget
    chunk = max(64, min(base, 1024))
    if getattr(device, "type", "cpu") == "cuda":
        keys = (budget or 4096) + 2048
        chunk = max(chunk, min(4096, (256 << 20) // (4 * heads * keys)))
    return int(chunk)
