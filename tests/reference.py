"""An independent re-implementation of a policy's stream, to check the engine against.

It shares no code with streambench's cache or RoPE module: pre-RoPE keys and values are captured
by forward hooks on the projections, and every step rebuilds a plain `DynamicCache` from the kept
tokens' states, rotated with the model's own `apply_rotary_pos_emb` at positions 0..n-1 (the
re-indexing of mit-han-lab/streaming-llm), then runs the new tokens on top of it.

Keep-sets may differ per layer and KV head: `positions` is then (L, H, n), and each head of the
rebuilt cache holds exactly its own tokens, rotated at their ranks 0..n-1 in that head.

Why not "a fresh forward over the kept tokens"? In layers >= 1 a kept token's keys and values were
computed while it attended to tokens evicted since, so for a multi-layer model no eviction policy
can equal a fresh forward; for a 1-layer model it can, and tests check that too.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch
from transformers import DynamicCache

from streambench.policies.base import CacheView


class ReferenceStream:
    def __init__(self, model, policy):
        self.model, self.policy = model, policy
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.apply_rope = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
        layers = model.model.layers
        self.keys = [None] * len(layers)  # per layer (B, H, every token fed, D), pre-RoPE
        self.values = [None] * len(layers)
        self.positions = np.empty(0, dtype=np.int64)  # the kept tokens, time order
        self.scores = np.empty(0)
        self.prev_logprobs = None
        self.fed = 0
        self._new = {}
        self._handles = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            if hasattr(attn, "qkv_proj"):  # phi3: fused projection
                self._handles.append(attn.qkv_proj.register_forward_hook(self._hook_fused(i)))
            else:
                key_module = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
                self._handles.append(key_module.register_forward_hook(self._hook("k", i)))
                self._handles.append(attn.v_proj.register_forward_hook(self._hook("v", i)))

    def close(self):
        """Remove the hooks (the embedded model is shared between tests)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _split(self, out):  # (B, c, H*D) or (B, c, H, D) -> (B, H, c, D)
        b, c = out.shape[:2]
        return out.reshape(b, c, self.kv_heads, self.head_dim).transpose(1, 2)

    def _hook(self, kind, i):
        def hook(_module, _inputs, out):
            self._new[(kind, i)] = self._split(out).detach().clone()
        return hook

    def _hook_fused(self, i):
        def hook(_module, _inputs, out):
            q = self.heads * self.head_dim
            kv = self.kv_heads * self.head_dim
            self._new[("k", i)] = self._split(out[..., q : q + kv]).detach().clone()
            self._new[("v", i)] = self._split(out[..., q + kv :]).detach().clone()
        return hook

    @torch.no_grad()
    def feed(self, ids, keep_positions=None):
        """Feed `ids` after evicting as the policy says, or, given `keep_positions` (time order),
        after keeping exactly those tokens (to replay another engine's choices, e.g. retrieval)."""
        count = ids.shape[1]
        n = self.positions.shape[-1]
        layers = len(self.keys)
        if keep_positions is not None:
            self.positions = np.asarray(keep_positions, dtype=np.int64)
        elif self.policy.evicts and n + count > self.policy.budget:
            view = CacheView(n, count, self.policy.budget, self.positions, self.scores[self.positions],
                             num_layers=layers, kv_heads=self.kv_heads)
            keep = np.asarray(self.policy.select(view))
            if keep.ndim == 2:
                keep = np.broadcast_to(keep[:, None], (layers, self.kv_heads, keep.shape[-1]))
            if keep.ndim == 3 and self.positions.ndim == 1:
                self.positions = np.broadcast_to(self.positions, (layers, self.kv_heads, n))
            self.positions = np.take_along_axis(self.positions, keep, -1) if keep.ndim == 3 else self.positions[..., keep]
        n = self.positions.shape[-1]
        cache = DynamicCache(config=self.model.config)
        if n:
            pos = torch.arange(n, device=ids.device)[None]
            for i, (k, v) in enumerate(zip(self.keys, self.values)):
                if self.positions.ndim == 3:  # head h attends over its own tokens only
                    idx = torch.as_tensor(self.positions[i], device=ids.device)[None, :, :, None].expand(k.shape[0], -1, -1, k.shape[-1])
                    k, v = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
                else:
                    idx = torch.as_tensor(self.positions, device=ids.device)
                    k, v = k[:, :, idx], v[:, :, idx]
                cos, sin = self.model.model.rotary_emb(v, position_ids=pos)
                _, k_rot = self.apply_rope(k, k, cos, sin)
                cache.update(k_rot, v, i)
        self._new.clear()
        positions = torch.arange(n, n + count, device=ids.device)[None]
        logits = self.model(input_ids=ids, position_ids=positions, cache=cache).logits
        for i in range(len(self.keys)):
            k_new, v_new = self._new[("k", i)], self._new[("v", i)]
            self.keys[i] = k_new if self.keys[i] is None else torch.cat([self.keys[i], k_new], dim=2)
            self.values[i] = v_new if self.values[i] is None else torch.cat([self.values[i], v_new], dim=2)
        new = np.broadcast_to(np.arange(self.fed, self.fed + count), (*self.positions.shape[:-1], count))
        self.positions = np.concatenate([self.positions, new], axis=-1)
        self.scores = np.concatenate([self.scores, self._surprisal(ids, logits)])  # every token fed
        self.fed += count
        return logits

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
    with ReferenceStream(model, None) as fresh:
        fresh.feed(ids[:, torch.as_tensor(union)], keep_positions=np.empty(0, dtype=np.int64))
        return fresh.feed(ids[:, -1:], keep_positions=np.searchsorted(union, kept[..., :-1]))[0, -1]


