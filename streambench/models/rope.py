"""Rotary position tables: rotate a pre-RoPE key to any position, or undo the rotation of a cached key.

Transformers caches keys *after* RoPE. To move a kept key to a new slot exactly, the engine keeps
the pre-RoPE key (recovered once, when the token enters the cache) and rotates it afresh at the new
position. Composing many small rotations on the cached key instead would drift, badly in bf16.
The tables come from the model's own `rotary_emb`, so rope scaling (llama3, linear, yarn's
attention factor) and partial rotary dims are whatever the model computes.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The interleaved layout's rotate_half (Cohere, GLM, GPT-J): channels (2i, 2i+1) are a pair."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


# How a family applies its tables: "half" (rotate_half, Llama), "interleaved" (pairs, tables as the
# rotary module gives them: Cohere), "interleaved-from-half" (pairs, tables given in half layout and
# repeat-interleaved by the attention: GLM). architecture.Layout pins one against the model's own
# apply_rotary_pos_emb.
STYLES = ("half", "interleaved", "interleaved-from-half")


def as_applied(cos: torch.Tensor, sin: torch.Tensor, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    if style == "interleaved-from-half":
        half = cos.shape[-1] // 2
        return cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1)
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "half") -> torch.Tensor:
    """x rotated on its first rotary_dim channels (the tables' width), the rest passed through."""
    cos, sin = as_applied(cos, sin, style)
    rd = cos.shape[-1]
    part = x[..., :rd]
    turn = rotate_half(part) if style == "half" else rotate_pairs(part)
    out = part * cos + turn * sin
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


class RotaryTable:
    """cos/sin for positions [0, size), float32, grown on demand by doubling."""

    def __init__(
        self,
        rotary_emb: torch.nn.Module,
        device: torch.device,
        size: int = 1024,
        style: str = "half",
        layer_type: str | None = None,
    ):
        self.rotary_emb = rotary_emb
        self.device = device
        self.style = style
        self._extra = {"layer_type": layer_type} if layer_type is not None else {}  # Gemma 3: a table per layer kind
        self.cos = self.sin = self.inv_norm = None
        self._copies: dict = {}
        self.size = 0
        self.ensure(size)

    @torch.no_grad()
    def ensure(self, size: int) -> None:
        if size <= self.size:
            return
        size = max(size, 2 * self.size)
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        positions = torch.arange(size, device=self.device)[None]
        cos, sin = self.rotary_emb(probe, position_ids=positions, **self._extra)
        cos, sin = as_applied(cos[0].float(), sin[0].float(), self.style)
        self.cos, self.sin = cos, sin  # (P, rotary_dim), in the layout the attention applies them
        norm = self.cos.square() + self.sin.square()  # attention_scaling**2 (1 for plain RoPE)
        self.inv_norm = None if torch.allclose(norm, torch.ones_like(norm)) else 1.0 / norm
        half = self.cos.shape[-1] // 2
        # rotate-half RoPE repeats its frequencies (emb = cat(freqs, freqs)): then a rotation needs
        # only the first half of the tables, and no rotate_half copy (the flat path below)
        self.halved = self.style == "half" and bool(
            torch.equal(self.cos[:, :half], self.cos[:, half:]) and torch.equal(self.sin[:, :half], self.sin[:, half:])
        )
        self.size = size
        self._copies = {}  # per-device copies of the old tables are stale now

    def _on(self, device: torch.device):
        """The tables on `device` (a model spread over GPUs rotates keys on each layer's device)."""
        if device == self.cos.device:
            return self.cos, self.sin, self.inv_norm
        key = str(device)
        if key not in self._copies:
            self._copies[key] = tuple(None if t is None else t.to(device) for t in (self.cos, self.sin, self.inv_norm))
        return self._copies[key]

    @property
    def rotary_dim(self) -> int:
        return self.cos.shape[-1]

    def _apply(self, k: torch.Tensor, positions: torch.Tensor, inverse: bool, signed: bool = False) -> torch.Tensor:
        # k: (..., T, D) in any dtype; positions: (T,) long on k's device, or (B, T) for a
        # (L, B, H, T, D) stack of batched streams. Math in float32. signed: positions may be
        # negative (a sliding layer's keys behind a query at a small re-indexed position):
        # cos(-x) = cos(x), sin(-x) = -sin(x).
        table_cos, table_sin, inv_norm = self._on(k.device)
        norm_index = positions
        if signed:
            norm_index = positions.abs()
            cos, sin = (
                table_cos[norm_index],
                table_sin[norm_index] * torch.sign(positions).to(table_sin.dtype)[..., None],
            )
        elif self.halved and positions.dim() == 1 and k.dim() == 2 and inv_norm is None:
            return self._apply_rows(k, positions, table_cos, table_sin, inverse)
        else:
            cos, sin = table_cos[positions], table_sin[positions]  # (T, rd) or (B, T, rd)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]
        rd = cos.shape[-1]
        x = k[..., :rd].float()
        turn = rotate_half(x) if self.style == "half" else rotate_pairs(x)
        if inverse:
            out = x * cos - turn * sin
            if inv_norm is not None:
                scale = inv_norm[norm_index]
                out = out * (scale[:, None] if positions.dim() == 2 else scale)
        else:
            out = x * cos + turn * sin
        out = out.to(k.dtype)
        if rd < k.shape[-1]:
            out = torch.cat((out, k[..., rd:]), dim=-1)
        return out

    def _apply_rows(self, k, positions, table_cos, table_sin, inverse: bool) -> torch.Tensor:
        """Rows (M, D) at positions (M,): the re-rotation of per-head evictions, thousands of rows
        a step. Same arithmetic as `_apply` (float32, x*cos +- rotate_half(x)*sin), in halves."""
        half = table_cos.shape[-1] // 2
        cos, sin = table_cos[positions, :half], table_sin[positions, :half]
        if inverse:
            sin = -sin
        x1, x2 = k[:, :half].float(), k[:, half : 2 * half].float()
        out = torch.empty_like(k)
        out[:, :half] = x1 * cos - x2 * sin
        out[:, half : 2 * half] = x2 * cos + x1 * sin
        if 2 * half < k.shape[-1]:
            out[:, 2 * half :] = k[:, 2 * half :]
        return out

    def shift(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys rotated at positions p, moved to p + delta all alike: one angle per frequency (no
        per-row tables), so it costs one pass over k. The kvpress bridge shows a press the cache
        at ranks 0..n-1 this way (its keys sit at rank + offset). Math in float32."""
        if delta == 0:
            return k
        self.ensure(abs(delta) + 1)
        table_cos, table_sin, inv_norm = self._on(k.device)
        cos, sin = table_cos[abs(delta)], table_sin[abs(delta)]
        if delta < 0:
            sin = -sin
        if inv_norm is not None:  # the tables carry attention_scaling: a pure rotation divides it out
            scale = inv_norm[abs(delta)].sqrt()
            cos, sin = cos * scale, sin * scale
        rd = cos.shape[-1]
        x = k[..., :rd].float()
        if self.style == "half":  # rotate_half(x) * sin without building rotate_half(x)
            half = rd // 2
            out = x * cos
            out[..., :half].addcmul_(x[..., half:], sin[:half], value=-1)
            out[..., half:].addcmul_(x[..., :half], sin[half:])
        else:
            out = x * cos + rotate_pairs(x) * sin
        out = out.to(k.dtype)
        return out if rd == k.shape[-1] else torch.cat((out, k[..., rd:]), dim=-1)

    def rotate_each(self, k_pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """k_pre (..., T, D) with one position per row, positions (..., T): a quantized cache
        holds keys before RoPE and rotates them as attention reads them. Math in float32."""
        table_cos, table_sin, _ = self._on(k_pre.device)
        if self.halved:  # (the flat path of _apply_rows: half the tables, no rotate_half copy)
            half = table_cos.shape[-1] // 2
            cos, sin = table_cos[positions, :half], table_sin[positions, :half]
            x1, x2 = k_pre[..., :half].float(), k_pre[..., half : 2 * half].float()
            out = torch.empty_like(k_pre)
            out[..., :half] = x1 * cos - x2 * sin
            out[..., half : 2 * half] = x2 * cos + x1 * sin
            if 2 * half < k_pre.shape[-1]:
                out[..., 2 * half :] = k_pre[..., 2 * half :]
            return out
        cos, sin = table_cos[positions], table_sin[positions]
        rd = cos.shape[-1]
        x = k_pre[..., :rd].float()
        turn = rotate_half(x) if self.style == "half" else rotate_pairs(x)
        out = (x * cos + turn * sin).to(k_pre.dtype)
        return out if rd == k_pre.shape[-1] else torch.cat((out, k_pre[..., rd:]), dim=-1)

    def rotate(self, k_pre: torch.Tensor, positions: torch.Tensor, signed: bool = False) -> torch.Tensor:
        return self._apply(k_pre, positions, inverse=False, signed=signed)

    def unrotate(self, k: torch.Tensor, positions: torch.Tensor, signed: bool = False) -> torch.Tensor:
        return self._apply(k, positions, inverse=True, signed=signed)
