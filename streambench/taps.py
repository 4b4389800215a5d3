"""QueryTap: the pre-RoPE query of the last fed token, per layer, for retrieval policies.

Forward hooks on each attention's query projection (`q_proj`; `q_norm` where the model normalises
queries, as Qwen3; the query part of a fused `qkv_proj`, as Phi-3). Only the last position is kept,
and query heads are averaged per KV head (GQA groups), giving (layers, kv_heads, head_dim).
"""
from __future__ import annotations

import torch


class QueryTap:
    def __init__(self, model, num_heads: int, kv_heads: int, head_dim: int):
        self.heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        layers = model.model.layers
        self._last: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = []
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            if hasattr(attn, "q_norm"):
                module = attn.q_norm
            elif hasattr(attn, "q_proj"):
                module = attn.q_proj
            else:
                module = attn.qkv_proj
            self._handles.append(module.register_forward_hook(self._hook(i)))

    def _hook(self, layer: int):
        def hook(_module, _inputs, out):
            last = out[0, -1].reshape(-1)[: self.heads * self.head_dim]  # fused qkv: the q part
            self._last[layer] = last.detach()

        return hook

    def query(self) -> torch.Tensor | None:
        """(layers, kv_heads, head_dim) float32, or None before the first forward."""
        if any(q is None for q in self._last):
            return None
        first = self._last[0].device  # layers may sit on several GPUs (--device-map)
        q = torch.stack([q.to(first) for q in self._last]).float().reshape(len(self._last), self.kv_heads, -1, self.head_dim)
        return q.mean(dim=2)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
