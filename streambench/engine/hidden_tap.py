"""HiddenStateTap: the inputs of each governed attention layer for the last `window` fed tokens.

kvpress's presses score a cache from the hidden states that enter an attention layer (they
project their own queries from them: SnapKV's window, ExpectedAttention's query statistics,
TOVA's last query); its decoding mode keeps a buffer of the most recent ones
(`DecodingPress.hidden_states_buffer_size`). This tap keeps that buffer for a streaming session:
a forward pre-hook on each full-attention layer's attention module copies the last tokens' input
into a per-layer ring written in place. The ring is stored twice over (B, 2 * window, hidden: slot
s at s and s + window), so the last w tokens are always one contiguous slice, read without a
copy. A checkpoint shares the rings and the first write after it copies them (dialogue branches
roll back).
"""

from __future__ import annotations

import torch

from streambench.models.architecture import layout_of


class HiddenStateTap:
    def __init__(self, model, window: int):
        if window < 1:
            raise ValueError(f"hidden-state window must be >= 1, got {window}")
        layout = layout_of(model)
        self.modules = [a for a, kind in zip(layout.attentions, layout.layer_kinds) if kind != "sliding_attention"]
        self.window = window
        self.growing = False  # True (session.unbounded): the ring doubles instead of wrapping
        self._handles = [
            m.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self.modules)
        ]
        self.reset()

    def reset(self) -> None:
        self._ring: list[torch.Tensor | None] = [None] * len(self.modules)
        self._seen = 0  # tokens written (the ring's write position, mod window)
        self._pending = 0  # tokens of the forward running now (layers write one after another)
        self._shared = [False] * len(self.modules)

    def _hook(self, layer: int):
        def hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None:
                return None
            ring = self._ring[layer]
            count = hidden.shape[1]
            if self.growing and self._seen + count > self.window:
                self._enlarge(self._seen + count)
                ring = self._ring[layer]
            if ring is None:
                ring = hidden.new_zeros(hidden.shape[0], 2 * self.window, hidden.shape[-1])
            elif self._shared[layer] or ring.shape[0] != hidden.shape[0]:
                ring = ring.clone() if ring.shape[0] == hidden.shape[0] else hidden.new_zeros(ring.shape)
                self._shared[layer] = False
            self._ring[layer] = ring
            take = min(count, self.window)
            slots = torch.arange(self._seen + count - take, self._seen + count, device=ring.device) % self.window
            new = hidden[:, count - take :].detach().to(ring.dtype)
            ring.index_copy_(1, slots, new)
            ring.index_copy_(1, slots + self.window, new)
            self._pending = count
            return None

        return hook

    def _enlarge(self, needed: int) -> None:
        """Room for `needed` tokens without wrapping: every ring rewritten oldest-first, doubled."""
        window = max(needed, 2 * self.window)
        held = min(self._seen, self.window)
        for i, ring in enumerate(self._ring):
            if ring is None:
                continue
            start = (self._seen - held) % self.window
            bigger = ring.new_zeros(ring.shape[0], 2 * window, ring.shape[-1])
            last = ring[:, start : start + held]
            slots = torch.arange(self._seen - held, self._seen, device=ring.device) % window
            bigger.index_copy_(1, slots, last)
            bigger.index_copy_(1, slots + window, last)
            self._ring[i] = bigger
            self._shared[i] = False
        self.window = window

    def commit(self) -> None:
        """After a forward: its tokens count as seen (every layer has written them)."""
        self._seen += self._pending
        self._pending = 0

    def last(self, stream: int = 0, count: int | None = None) -> list[torch.Tensor]:
        """Per layer, (1, w, hidden) views: the inputs of the last w = min(seen, window, count)
        tokens, oldest first."""
        w = min(self._seen, self.window, self.window if count is None else count)
        start = (self._seen - w) % self.window
        return [
            torch.empty(0) if ring is None or w == 0 else ring[stream : stream + 1, start : start + w]
            for ring in self._ring
        ]

    @property
    def seen(self) -> int:
        return self._seen

    def state(self):
        """A checkpoint keeps references; the first write after it copies."""
        self._shared = [True] * len(self._shared)
        return self._seen, list(self._ring), self.window

    def restore(self, state) -> None:
        self._seen, ring, self.window = state  # (a branch may have enlarged the rings)
        self._ring = list(ring)
        self._shared = [True] * len(self._shared)
        self._pending = 0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
