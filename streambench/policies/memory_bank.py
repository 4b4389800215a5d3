"""A memory bank of evicted KV blocks, for LongMem-style retrieval (policies/longmem.py).

Blocks of `block_size` consecutive evicted tokens, all layers, pre-RoPE keys and values, kept on
`device` (CPU by default: GPU memory stays flat however long the stream). Each block has one
representative key per layer and KV head: the mean of its keys (LongMem mean-pools its chunk
keys). The bank is a ring: when `capacity_tokens` is reached the oldest block is overwritten first,
as LongMem's memory evicts its oldest chunks.

Retrieval scores every block by the inner product of the current pre-RoPE queries with its
representative keys, summed over layers and heads (one ranking for all layers, so every layer
holds the same tokens and positions stay shared), and returns the top-k. Exact top-k with torch;
an optional FAISS inner-product index serves the same call when the bank is large.
"""

from __future__ import annotations

import numpy as np
import torch


class MemoryBank:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        block_size: int,
        capacity_tokens: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        index: str = "exact",
    ):
        self.block_size = block_size
        self.max_blocks = max(1, capacity_tokens // block_size)
        self.device = torch.device(device)
        self._shape = (num_layers, kv_heads, block_size, head_dim)
        self._dtype = dtype
        # Storage grows by doubling up to max_blocks: memory follows the stream, not the limit.
        self.keys = torch.zeros((0, *self._shape), dtype=dtype, device=self.device)  # pre-RoPE
        self.values = torch.zeros((0, *self._shape), dtype=dtype, device=self.device)
        self.repr = torch.zeros((0, num_layers * kv_heads * head_dim), dtype=torch.float32, device=self.device)
        self.pos = np.full((0, block_size), -1, dtype=np.int64)  # stream positions of each block
        self.count = 0  # blocks ever written; slot = block number % max_blocks
        self.index = index
        self._pending_pos: list[np.ndarray] = []
        self._pending_k: list[torch.Tensor] = []
        self._pending_v: list[torch.Tensor] = []

    # ---- writing -----------------------------------------------------------------------------
    def add(self, positions: np.ndarray, k_pre: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens leaving the active cache, in time order; k_pre/v: (L, H, T, D) on any device."""
        if len(positions) == 0:
            return
        self._pending_pos.append(np.asarray(positions))
        self._pending_k.append(k_pre.to(self.device, self.keys.dtype))
        self._pending_v.append(v.to(self.device, self.values.dtype))
        pending = sum(len(p) for p in self._pending_pos)
        if pending < self.block_size:
            return
        pos = np.concatenate(self._pending_pos)
        k = torch.cat(self._pending_k, dim=2)
        vv = torch.cat(self._pending_v, dim=2)
        full = (len(pos) // self.block_size) * self.block_size
        for b in range(0, full, self.block_size):
            self._write_block(
                pos[b : b + self.block_size], k[:, :, b : b + self.block_size], vv[:, :, b : b + self.block_size]
            )
        self._pending_pos = [pos[full:]] if full < len(pos) else []
        self._pending_k = [k[:, :, full:]] if full < len(pos) else []
        self._pending_v = [vv[:, :, full:]] if full < len(pos) else []

    def _grow(self) -> None:
        size = min(self.max_blocks, max(16, 2 * len(self.pos)))
        extra = size - len(self.pos)
        self.keys = torch.cat([self.keys, self.keys.new_zeros((extra, *self._shape))])
        self.values = torch.cat([self.values, self.values.new_zeros((extra, *self._shape))])
        self.repr = torch.cat([self.repr, self.repr.new_zeros((extra, self.repr.shape[1]))])
        self.pos = np.concatenate([self.pos, np.full((extra, self.block_size), -1, dtype=np.int64)])

    def _write_block(self, positions: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        slot = self.count % self.max_blocks  # the oldest block goes first
        if slot >= len(self.pos):
            self._grow()
        self.keys[slot] = k
        self.values[slot] = v
        self.repr[slot] = k.float().mean(dim=2).reshape(-1)
        self.pos[slot] = positions
        self.count += 1

    # ---- reading -----------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return min(self.count, self.max_blocks)

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    def bytes(self) -> int:
        """Bytes of the keys and values held (the bank's storage may be up to 2x while growing)."""
        per_block = 2 * int(np.prod(self._shape)) * self.keys.element_size()
        return self.blocks * per_block

    def search(self, query: torch.Tensor, k: int, exclude: set[int] = frozenset()) -> list[int]:
        """Slots of the k best blocks for `query` (L, H, D) pre-RoPE, best first."""
        n = self.blocks
        if n == 0 or k <= 0:
            return []
        q = query.to(self.device, torch.float32).reshape(-1)
        if self.index == "faiss" and n > 4 * k:
            return self._search_faiss(q, k, exclude)
        scores = self.repr[:n] @ q
        order = torch.argsort(scores, descending=True).tolist()
        return [s for s in order if s not in exclude][:k]

    def _search_faiss(self, q: torch.Tensor, k: int, exclude) -> list[int]:
        import faiss  # optional: pip install faiss-cpu

        index = faiss.IndexFlatIP(self.repr.shape[1])
        index.add(self.repr[: self.blocks].cpu().numpy())
        _, found = index.search(q.cpu().numpy()[None], min(self.blocks, k + len(exclude)))
        return [int(s) for s in found[0] if s >= 0 and int(s) not in exclude][:k]

    def block(self, slot: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(positions, k_pre (L, H, T, D), v) of one block."""
        return self.pos[slot], self.keys[slot], self.values[slot]
