"""longmem: evicted KV blocks kept in a memory bank and retrieved back into attention.

This is the training-free, LongMem-style retrieval policy, NOT LongMem's trained SideNet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from streambench.policies import register_policy
from streambench.policies.base import CacheView, RetrievalPolicy


class Recall(NamedTuple):
    keep: np.ndarray  # ranks that stay
    at: int  # rank where the retrieved tokens go (right after the sinks)
    positions: np.ndarray
    k_pre: object  # (L, B, H, m, D) pre-RoPE keys
    values: object


@register_policy("longmem")
@dataclass
class LongMemPolicy(RetrievalPolicy):
    """LongMem (Wang et al., arXiv:2306.07174) caches past keys and values in a memory bank and lets
    current tokens attend to retrieved chunks beside their local context; its fusion needs a trained
    SideNet, which no checkpoint provides for modern models. The training-free way to the same
    behaviour is InfLLM's (Xiao et al., arXiv:2402.04617): blocks of evicted KV with representative
    keys, top-k blocks retrieved by the current query and placed between the attention sinks and the
    recent window, positions re-indexed as StreamingLLM does.

    Tokens leaving the recent window fill blocks of `block_size` in the bank (`bank_tokens` at most,
    oldest block overwritten first, on `bank_device`). Every `refresh` tokens, and at each user turn,
    blocks are scored by the mean of their pre-RoPE keys against the last token's pre-RoPE query,
    summed over all layers and KV heads (one choice for all layers), and the `top_k` best replace the
    retrieved region. Budget = start_size + top_k * block_size + recent_size. Defaults: blocks of
    budget/32 tokens (4 to 128; LongMem's chunks are 4), top_k filling about a quarter of the budget,
    refresh every 4 tokens (each refresh is an inner product over every bank block: at 64K bank
    tokens in blocks of 4 that is ~94M multiply-adds for the embedded model)."""

    summary = (
        "LongMem-style memory bank (training-free, InfLLM-style retrieval; not the trained SideNet): "
        "sinks + top-k retrieved evicted blocks + recent window"
    )
    sizes = ("block_size", "recent_size")
    start_size: int = 4
    block_size: int | None = None
    top_k: int | None = None
    recent_size: int | None = None
    bank_tokens: int = 65536
    bank_device: str = "cpu"
    refresh: int = 4
    index: str = "exact"
    _bank: object = field(default=None, init=False, repr=False, compare=False)
    _retrieved: np.ndarray = field(default=None, init=False, repr=False, compare=False)
    _frontier: int = field(default=-1, init=False, repr=False, compare=False)  # newest banked position
    _recalls: int = field(default=0, init=False, repr=False, compare=False)

    def configure(self) -> None:
        self._check_int("start_size", 0)
        if self.block_size is None:  # LongMem's chunks are 4 tokens; larger blocks for large budgets
            self._require(self.budget is not None, "needs a budget or block_size")
            self.block_size = int(min(128, max(4, self.budget // 32)))
        self._check_int("block_size", 1)
        if self.top_k is None:  # about a quarter of the budget is retrieved memory
            self._require(self.budget is not None, "needs a budget or top_k")
            self.top_k = max(1, self.budget // (4 * self.block_size))
        self._check_int("top_k", 0)
        retrieved = self.top_k * self.block_size
        if self.recent_size is None:
            self._require(self.budget is not None, "needs a budget or recent_size")
            self.recent_size = self.budget - self.start_size - retrieved
            self._require(
                self.recent_size >= 1,
                f"budget {self.budget} must exceed start_size + top_k * block_size = {self.start_size + retrieved}",
            )
        self._check_int("recent_size", 1)
        total = self.start_size + retrieved + self.recent_size
        self._require(
            self.budget in (None, total),
            f"start_size + top_k * block_size + recent_size = {total} disagrees with budget {self.budget}",
        )
        self.budget = total
        self._check_int("bank_tokens", self.block_size)
        self._check_int("refresh", 1)
        self._require(self.index in ("exact", "faiss"), f"index must be exact or faiss, got {self.index!r}")
        if self.index == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                self._require(False, "index=faiss needs the faiss-cpu package: pip install faiss-cpu")
        self._retrieved = np.empty(0, dtype=np.int64)

    @property
    def max_incoming(self) -> int:
        return self.recent_size

    @property
    def bank(self):
        return self._bank

    def select(self, view: CacheView) -> np.ndarray:
        """Between recalls: keep the sinks and the retrieved blocks; slide the recent window."""
        head = min(self.start_size + len(self._retrieved), view.length)
        recent = np.arange(max(head, view.length - (view.target - head)), view.length)
        return np.concatenate([np.arange(head), recent])

    def on_evict(self, positions: np.ndarray, k_pre, values) -> None:
        """Tokens leaving the cache: those from the recent window go to the bank (in blocks). They
        leave in time order, so anything not newer than the newest banked token came from the bank."""
        fresh = positions > self._frontier
        if not fresh.any():
            return
        self._frontier = int(positions[fresh].max())
        if self._bank is None:
            from streambench.policies.memory_bank import MemoryBank

            layers, _, heads, _, dim = k_pre.shape
            self._bank = MemoryBank(
                layers, heads, dim, self.block_size, self.bank_tokens, k_pre.dtype, self.bank_device, self.index
            )
        idx = np.flatnonzero(fresh)
        self._bank.add(positions[idx], k_pre[:, 0, :, idx], values[:, 0, :, idx])

    def recall(self, view: CacheView, query) -> Recall | None:
        """The top-k blocks for `query` replace the retrieved region (None: nothing to retrieve)."""
        if self._bank is None or self._bank.blocks == 0 or query is None or self.top_k == 0:
            return None
        import torch

        slots = sorted(self._bank.search(query, self.top_k), key=lambda s: self._bank.pos[s, 0])
        positions = np.concatenate([self._bank.pos[s] for s in slots])
        k_pre = torch.stack([self._bank.keys[s] for s in slots]).permute(1, 2, 0, 3, 4)
        values = torch.stack([self._bank.values[s] for s in slots]).permute(1, 2, 0, 3, 4)
        layers, heads, blocks, size, dim = k_pre.shape
        k_pre = k_pre.reshape(layers, heads, blocks * size, dim)[:, None]
        values = values.reshape(layers, heads, blocks * size, dim)[:, None]
        start = min(self.start_size, view.length)
        old_head = min(start + len(self._retrieved), view.length)
        room = max(0, view.target - start - len(positions))
        recent = np.arange(max(old_head, view.length - room), view.length)
        self._retrieved = positions
        self._recalls += 1
        return Recall(np.concatenate([np.arange(start), recent]), start, positions, k_pre, values)

    def stats(self) -> dict[str, float]:
        bank = self._bank
        return {
            "bank_tokens": bank.tokens if bank else 0,
            "bank_blocks": bank.blocks if bank else 0,
            "bank_mib": bank.bytes() / 2**20 if bank else 0.0,
            "recalls": self._recalls,
        }

    def reset(self) -> None:
        """A new stream: the bank starts empty."""
        self._bank = None
        self._retrieved = np.empty(0, dtype=np.int64)
        self._frontier = -1
