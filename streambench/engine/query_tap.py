"""QueryTap: the pre-RoPE query of the last fed token, per layer, for retrieval policies.

Forward hooks on each attention's query projection (`q_proj`; `q_norm`/`q_layernorm` where the
model normalises queries, as Qwen3, StableLM; the query part of a fused `qkv_proj`, as Phi-3; the
query part of a fused `query_key_value`, unpacked as GPT-NeoX and Falcon's layouts do). Only the last position
is kept, and query heads are averaged per KV head (GQA groups), giving (layers, kv_heads, head_dim).
"""

from __future__ import annotations

import torch

from streambench.errors import ConfigError
from streambench.models.architecture import layout_of


class QueryTap:
    def __init__(self, model, num_heads: int, kv_heads: int, head_dim: int):
        self.heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
        layout = layout_of(model)
        governed = [a for a, kind in zip(layout.attentions, layout.layer_kinds) if kind != "sliding_attention"]
        self._last: list[torch.Tensor | None] = [None] * len(governed)
        self._handles = []
        for i, attn in enumerate(governed):  # the full-attention layers, whose tokens the bank holds
            layout_kind = "flat"
            for name in ("q_proj", "qkv_proj", "query_key_value"):
                module = getattr(attn, name, None)
                if isinstance(module, torch.nn.Module):
                    break
            else:
                raise ConfigError(f"model type '{layout.model_type}': no query projection to tap for retrieval")
            if name == "query_key_value":  # how FalconAttention._split_heads and GPT-NeoX unpack it
                config = layout.config
                if getattr(config, "new_decoder_architecture", False):
                    layout_kind = "grouped"  # (kv groups, group + 2, head_dim): a group's queries, then k, v
                    self.groups = config.num_kv_heads
                elif not getattr(config, "multi_query", False):
                    layout_kind = "per_head"  # (heads, 3, head_dim): each head's q, k, v side by side
            norm = next(
                (
                    getattr(attn, n)
                    for n in ("q_norm", "q_layernorm")
                    if isinstance(getattr(attn, n, None), torch.nn.Module)
                ),
                None,
            )
            self._handles.append(module.register_forward_hook(self._hook(i, layout_kind, norm)))

    def _hook(self, layer: int, kind: str, norm):
        def hook(_module, _inputs, out):
            last = out[0, -1].reshape(-1)
            if kind == "per_head":
                last = last.view(self.heads, 3, self.head_dim)[:, 0]
            elif kind == "grouped":
                last = last.view(self.groups, -1, self.head_dim)[:, :-2]
            last = last.reshape(-1)[: self.heads * self.head_dim]  # fused qkv: the q part
            if norm is not None:  # the model normalises queries before RoPE: do it for this one token
                last = self._normed(norm, last)
            self._last[layer] = last.detach()

        return hook

    def _normed(self, norm, q: torch.Tensor) -> torch.Tensor:
        """Apply a query norm to one token's (heads * head_dim,) query in the shape it expects:
        over all heads (OLMo 2), per (head, dim) table (Cohere), or per head on (B, H, T, D)
        (Qwen3, Gemma 3, StableLM's per-head norms)."""
        weight = getattr(norm, "weight", None)
        shape: tuple[int, ...]
        if weight is not None and weight.dim() == 2:
            shape = (1, 1, self.heads, self.head_dim)
        elif weight is not None and weight.numel() == self.heads * self.head_dim:
            shape = (1, 1, self.heads * self.head_dim)
        else:
            shape = (1, self.heads, 1, self.head_dim)
        return norm(q.view(shape)).reshape(-1)

    def query(self) -> torch.Tensor | None:
        """(layers, kv_heads, head_dim) float32, or None before the first forward."""
        last = [q for q in self._last if q is not None]
        if len(last) < len(self._last):
            return None
        first = last[0].device  # layers may sit on several GPUs (--device-map)
        q = torch.stack([q.to(first) for q in last]).float().reshape(len(self._last), self.kv_heads, -1, self.head_dim)
        return q.mean(dim=2)

    def state(self) -> list[torch.Tensor | None]:
        """The last query per layer, for a branch (`StreamSession.fork`) to put back."""
        return list(self._last)

    def restore(self, state: list[torch.Tensor | None]) -> None:
        self._last = list(state)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
