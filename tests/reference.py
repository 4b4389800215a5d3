"""An independent re-implementation of a policy's stream, to check the engine against.

It shares no code with streambench's cache or RoPE module: the keys and values every layer writes
are captured as the model hands them to its cache (so any family's projection layout works), the
keys un-rotated from the positions they were fed at with the model's own `apply_rotary_pos_emb`
and `rotary_emb` (on the first rotary_dim channels, the tables' width), and every step rebuilds a
plain `DynamicCache` from the kept tokens' states, rotated again at positions 0..n-1 (the
re-indexing of mit-han-lab/streaming-llm), then runs the new tokens on top of it.

Keep-sets may differ per layer and KV head: `positions` is then (L, H, n), and each head of the
rebuilt cache holds exactly its own tokens, rotated at their ranks 0..n-1 in that head.

Lanes may keep unequal counts (`positions` (L, H, n) with -1 before a lane's kept tokens): each
head then attends over its own c tokens through this module's own eager attention, per head, with
no padding at all (`_per_head_attention`): its kept keys rotated so that the query sees the j-th
at distance c - j, as a lane re-indexed to 0..c-1 on its own.

Why not "a fresh forward over the kept tokens"? In layers >= 1 a kept token's keys and values were
computed while it attended to tokens evicted since, so for a multi-layer model no eviction policy
can equal a fresh forward; for a 1-layer model it can, and tests check that too.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import torch
from transformers import DynamicCache

from streambench.policies.base import CacheView


class _Recording(DynamicCache):
    """A DynamicCache that also hands each layer's new keys and values to `sink`."""

    def __init__(self, sink, **kwargs):
        super().__init__(**kwargs)
        self._sink = sink

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._sink[layer_idx] = (key_states.detach().clone(), value_states.detach().clone())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


_RAGGED: list[dict] = []  # per forward: full layer index -> per KV head (keys rotated, values)
_REF_NAME = "reference_per_head"


def _per_head_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
    """Eager attention, one KV head at a time. A layer with per-head kept sets (in `_RAGGED`)
    attends, in head h, over exactly head h's kept keys followed by the new tokens' own keys."""
    lanes = _RAGGED[-1].get(module.layer_idx) if _RAGGED else None
    b, heads, q, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    scale = scaling if scaling is not None else d**-0.5
    outs = []
    for h in range(kv):
        if lanes is not None:
            kept_k, kept_v = lanes[h]
            k = torch.cat([kept_k, key[:, h, key.shape[2] - q :]], dim=1)
            v = torch.cat([kept_v, value[:, h, value.shape[2] - q :]], dim=1)
        else:
            k, v = key[:, h], value[:, h]
        n = k.shape[1]
        if lanes is not None or attention_mask is None:
            allowed = torch.ones(q, n, dtype=torch.bool, device=query.device).tril(n - q)[None, None]
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask[:, :, :, :n]
        else:
            allowed = attention_mask[:, :, :, :n] == 0
        qh = query[:, h * groups : (h + 1) * groups].float()
        scores = torch.matmul(qh, k.float().transpose(-1, -2)[:, None]) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        outs.append(torch.matmul(probs.to(v.dtype), v[:, None]))
    return torch.cat(outs, dim=1).transpose(1, 2).contiguous(), None


def _register_per_head():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_REF_NAME, _per_head_attention)
    AttentionMaskInterface.register(_REF_NAME, sdpa_mask)


def fake_quantize(x, bits, group):
    """x (..., D) as a per-token-group quantized cache holds it: each group of `group` channels
    min-max quantized to `bits` bits and back (an independent re-implementation: no packing,
    no streambench code)."""
    g = x.float().reshape(-1, group)
    low, high = g.min(dim=-1, keepdim=True).values, g.max(dim=-1, keepdim=True).values
    scale = (high - low) / (2**bits - 1)
    codes = torch.round((g - low) / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, 2**bits - 1)
    return (low + codes * scale).to(x.dtype).reshape(x.shape)


class ReferenceStream:
    def __init__(self, model, policy, quant=None):
        """quant: (bits, group[, method, residual]): the full-attention layers hold every token's
        pre-RoPE key and value quantized (`fake_quantize`) once it is `residual` tokens old
        (method "kivi": keys per channel over each block of `group` stream positions, from the
        tokens each head keeps when the block is complete); a forward's own tokens attend in full
        precision."""
        self.model, self.policy = model, policy
        self.quant = None
        if quant is not None:
            bits, group, *rest = quant
            method = rest[0] if rest else "token"
            residual = rest[1] if len(rest) > 1 else (128 if method == "kivi" else 0)
            self.quant = (bits, group, method, residual)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.rotary_emb = model.base_model.rotary_emb
        self.apply_rope = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
        self.layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        self.takes_type = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        # Hybrid models: the policy keeps tokens in the full-attention layers; a sliding layer sees
        # the last window - 1 stream tokens at their stream distances from the query, through the
        # model's own sliding cache layer (DynamicSlidingWindowLayer) and mask.
        self.window = getattr(cfg, "sliding_window", None)
        self.full = [i for i, kind in enumerate(self.layer_types) if kind != "sliding_attention"]
        self.rank = {i: r for r, i in enumerate(self.full)}
        layers = cfg.num_hidden_layers
        self.keys = [None] * layers  # per layer (B, H, every token fed, D), pre-RoPE
        self.values = [None] * layers
        self.qkeys = [None] * layers  # the same, as a quantized cache holds them (full layers)
        self.qvalues = [None] * layers
        self.positions = np.empty(0, dtype=np.int64)  # the kept tokens, time order
        self.scores = np.empty(0)
        self.prev_logprobs = None
        self.fed = 0
        self._new = {}

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _rotate(self, k, positions, layer):
        """k (B, H, T, D) rotated at `positions` (T,) by the model's own functions (negative
        positions undo a rotation)."""
        extra = {"layer_type": self.layer_types[layer]} if self.takes_type else {}
        cos, sin = self.rotary_emb(k.float(), position_ids=positions[None], **extra)
        rd = cos.shape[-1]
        _, rotated = self.apply_rope(k[..., :rd], k[..., :rd], cos.to(k.dtype), sin.to(k.dtype))
        return torch.cat([rotated.to(k.dtype), k[..., rd:]], dim=-1)

    @torch.no_grad()
    def feed(self, ids, keep_positions=None):
        """Feed `ids` after evicting as the policy says, or, given `keep_positions` (time order),
        after keeping exactly those tokens (to replay another engine's choices, e.g. retrieval)."""
        count = ids.shape[1]
        n = self.positions.shape[-1]
        layers = len(self.full)
        kv_heads = self.keys[0].shape[1] if self.keys[0] is not None else 1
        if keep_positions is not None:
            self.positions = np.asarray(keep_positions, dtype=np.int64)
        elif self.policy.evicts and n + count > self.policy.budget:
            view = CacheView(
                n,
                count,
                self.policy.budget,
                self.positions,
                self.scores[self.positions],
                num_layers=layers,
                kv_heads=kv_heads,
            )
            keep = np.asarray(self.policy.select(view))
            if keep.ndim == 2:
                keep = np.broadcast_to(keep[:, None], (layers, kv_heads, keep.shape[-1]))
            if keep.ndim == 3 and self.positions.ndim == 1:
                self.positions = np.broadcast_to(self.positions, (layers, kv_heads, n))
            self.positions = (
                np.take_along_axis(self.positions, keep, -1) if keep.ndim == 3 else self.positions[..., keep]
            )
        n = self.positions.shape[-1]
        self._new.clear()
        cache = _Recording(self._new, config=self.model.config)
        if n and (self.positions < 0).any():
            return self._feed_ragged(ids, cache)
        if n:
            pos = torch.arange(n, device=ids.device)
            for i, (k, v) in enumerate(self._held(i) for i in range(len(self.keys))):
                if i not in self.rank:  # sliding: the stream's last window - 1 tokens
                    self._slide(cache, i, k, v, n)
                    continue
                if self.positions.ndim == 3:  # head h attends over its own tokens only
                    idx = torch.as_tensor(self.positions[self.rank[i]], device=ids.device)[None, :, :, None].expand(
                        k.shape[0], -1, -1, k.shape[-1]
                    )
                    k, v = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
                else:
                    idx = torch.as_tensor(self.positions, device=ids.device)
                    k, v = k[:, :, idx], v[:, :, idx]
                DynamicCache.update(cache, self._rotate(k, pos, i), v, i)
        positions = torch.arange(n, n + count, device=ids.device)
        logits = self.model(input_ids=ids, position_ids=positions[None], cache=cache).logits
        return self._record(ids, positions, logits)

    def _fronts(self, fed):
        bits, group, method, residual = self.quant
        values = max(0, fed - residual)
        return (values - values % group if method == "kivi" else values), values

    def _held(self, i):
        """Layer i's keys and values of every token fed, as the cache holds them now."""
        k, v = self.keys[i], self.values[i]
        if self.quant is None or i not in self.rank or k is None:
            return k, v
        fk, fv = self._fronts(self.fed)
        k = torch.cat([self.qkeys[i][:, :, :fk], k[:, :, fk:]], dim=2)
        v = torch.cat([self.qvalues[i][:, :, :fv], v[:, :, fv:]], dim=2)
        return k, v

    def _flush_blocks(self, fed_before):
        """KIVI: each key block completed by this step, per head from the tokens it keeps."""
        bits, group, method, _ = self.quant
        if method != "kivi":
            return
        for block in range(self._fronts(fed_before)[0], self._fronts(self.fed)[0], group):
            for i in self.full:
                keys = self.keys[i]
                for h in range(keys.shape[1]):
                    kept = self.positions if self.positions.ndim == 1 else self.positions[self.rank[i], h]
                    members = torch.as_tensor(kept[(kept >= block) & (kept < block + group)])
                    if not len(members):
                        continue
                    x = keys[0, h, members].float()
                    low, high = x.min(dim=0).values, x.max(dim=0).values
                    scale = (high - low) / (2**bits - 1)
                    codes = torch.round((x - low) / torch.where(scale > 0, scale, torch.ones_like(scale)))
                    self.qkeys[i][0, h, members] = (low + codes.clamp(0, 2**bits - 1) * scale).to(keys.dtype)

    def _record(self, ids, positions, logits):
        count = ids.shape[1]
        fed_before = self.fed
        for i in range(len(self.keys)):
            k_new, v_new = self._new[i]
            k_new = self._rotate(k_new, -positions, i)  # back to pre-RoPE
            if self.quant is not None and i in self.rank:
                bits, group, method = self.quant[:3]
                qk = k_new.clone() if method == "kivi" else fake_quantize(k_new, bits, group)
                qv = fake_quantize(v_new, bits, group)
                self.qkeys[i] = qk if self.qkeys[i] is None else torch.cat([self.qkeys[i], qk], dim=2)
                self.qvalues[i] = qv if self.qvalues[i] is None else torch.cat([self.qvalues[i], qv], dim=2)
            self.keys[i] = k_new if self.keys[i] is None else torch.cat([self.keys[i], k_new], dim=2)
            self.values[i] = v_new if self.values[i] is None else torch.cat([self.values[i], v_new], dim=2)
        new = np.broadcast_to(np.arange(self.fed, self.fed + count), (*self.positions.shape[:-1], count))
        self.positions = np.concatenate([self.positions, new], axis=-1)
        self.scores = np.concatenate([self.scores, self._surprisal(ids, logits)])  # every token fed
        self.fed += count
        if self.quant is not None:
            self._flush_blocks(fed_before)
        return logits

    def _slide(self, cache, i, k, v, n):
        """Sliding layer i: the stream's last window - 1 tokens at their distances from the query at n."""
        lo = max(0, self.fed - (self.window - 1))
        at = torch.arange(lo, self.fed, device=k.device) + (n - self.fed)
        assert cache.layers[i].is_sliding
        DynamicCache.update(cache, self._rotate(k[:, :, lo:], at, i), v[:, :, lo:], i)

    def _feed_ragged(self, ids, cache):
        """Lanes keeping unequal counts: head h of full layer i attends over its own c kept tokens
        (keys rotated at n - c + j for the query at n: distances c - j, as if re-indexed to
        0..c-1 alone) and the new tokens, in `_per_head_attention`; the model's cache holds
        zeros of the longest lane's length so that its own positions and masks line up."""
        n, count, device = self.positions.shape[-1], ids.shape[1], ids.device
        lanes: dict[int, list] = {}
        for i, (k, v) in enumerate(self._held(i) for i in range(len(self.keys))):
            if i not in self.rank:  # sliding: the stream's last window - 1 tokens, as in feed()
                self._slide(cache, i, k, v, n)
                continue
            per_head = []
            for h in range(k.shape[1]):
                kept = self.positions[self.rank[i], h]
                kept = torch.as_tensor(kept[kept >= 0], device=device)
                c = len(kept)
                at = torch.arange(n - c, n, device=device)
                per_head.append((self._rotate(k[:, h : h + 1, kept], at, i)[:, 0], v[:, h, kept]))
            lanes[i] = per_head
            DynamicCache.update(cache, torch.zeros_like(k[:, :, :n]), torch.zeros_like(v[:, :, :n]), i)
        _register_per_head()
        configs = {id(m.config): m.config for m in self.model.modules() if hasattr(m, "config")}
        configs[id(self.model.config)] = self.model.config
        saved = {key: c._attn_implementation for key, c in configs.items()}
        _RAGGED.append(lanes)
        try:
            for c in configs.values():
                c._attn_implementation = _REF_NAME
            positions = torch.arange(n, n + count, device=device)
            logits = self.model(input_ids=ids, position_ids=positions[None], cache=cache).logits
        finally:
            _RAGGED.pop()
            for key, c in configs.items():
                c._attn_implementation = saved[key]
        return self._record(ids, positions, logits)

    def new_round(self):
        kept = np.unique(self.positions)  # a score per token: per-head sets share their tokens' scores
        self.scores[kept] = self.policy.new_round(self.scores[kept])

    def _surprisal(self, ids, logits):
        if self.policy is None or "logits" not in self.policy.observes:
            return np.zeros(ids.shape[1])
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        tok = ids[0].tolist()
        if self.policy.score == "upstream":
            own = [-logprobs[i, t].item() for i, t in enumerate(tok)]
            return np.array([max(own)] + own[:-1])
        first = -self.prev_logprobs[tok[0]].item() if self.prev_logprobs is not None else 0.0
        rest = [-logprobs[i - 1, tok[i]].item() for i in range(1, len(tok))]
        self.prev_logprobs = logprobs[-1]
        return np.array([first] + rest)


@torch.no_grad()
def fresh_logits(model, ids, kept):
    """Last-token logits of a fresh computation over the kept tokens at positions 0..n-1. Kept sets
    per head (L=1, H, n): every token's key and value computed afresh from its embedding (a 1-layer
    model's states depend on nothing else), each head attending over its own tokens."""
    kept = np.asarray(kept)
    if kept.ndim == 1:
        return model(input_ids=ids[:, torch.as_tensor(kept)]).logits[0, -1]
    assert (kept[..., -1] == ids.shape[1] - 1).all()
    union = np.unique(kept[..., :-1])  # every token some head keeps, captured in one forward
    union = union[union >= 0]  # (-1: the pads of lanes keeping fewer tokens than others)
    replay = np.where(kept[..., :-1] >= 0, np.searchsorted(union, kept[..., :-1]), -1)
    with ReferenceStream(model, None) as fresh:
        fresh.feed(ids[:, torch.as_tensor(union)], keep_positions=np.empty(0, dtype=np.int64))
        return fresh.feed(ids[:, -1:], keep_positions=replay)[0, -1]
