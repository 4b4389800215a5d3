"""RecomputeSession: recompute-window, the baseline that keeps no cache at all.

For every new token the last `budget` tokens are re-encoded from scratch (streaming-llm's
"sliding window with re-computation" baseline, Xiao et al. 2023, Figure 1b): exact attention
over a window, at O(budget^2) per token. There is nothing to evict or re-index, so this is a
session without a cache: its state is the token window. `StreamSession(lm, policy)` returns one
for a policy with `recompute = True`.
"""

from __future__ import annotations

import numpy as np
import torch

from streambench.engine.session import StreamSession, StreamState
from streambench.errors import ConfigError


class RecomputeSession(StreamSession):
    recomputes = True
    _window: torch.Tensor  # (B, <= budget): the tokens the next one is encoded with

    def _set_batch(self, batch_size: int) -> None:
        super()._set_batch(batch_size)
        self.cache = None  # type: ignore[assignment]  # (no cache: the StreamSession code that reads one never runs here)

    def _govern_layers(self) -> int:
        return self.lm.info.num_layers  # every layer re-encodes the window (all-sliding models too)

    def _exact_chunks(self) -> str | None:
        return None  # a chunk's windows are rows of one forward (exact_chunks.recompute_rows)

    def reset(self) -> None:
        super().reset()
        self._window = torch.empty(self.batch, 0, dtype=torch.long, device=self.device)
        self._rows_tokens = 16384 if self.device.type == "cuda" else 4096  # window rows per forward

    def prime(self, ids: torch.Tensor) -> None:
        """Start from a window of these tokens without encoding them (a speed benchmark's warm
        state: feeding them would cost O(n * budget^2) for a state that is just the tokens)."""
        self._window = ids

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Logits (B, c, vocab); every token sees exactly the `budget` tokens up to itself, chunked
        (exact=True: one forward whose rows are the windows) or not."""
        if exact and ids.shape[1] > 1:
            self.processed += ids.shape[1]
            return self._feed_rows(ids)
        limit = self.max_incoming
        if limit is not None and ids.shape[1] > limit:
            return torch.cat([self.feed(ids[:, i : i + limit]) for i in range(0, ids.shape[1], limit)], dim=1)
        self.processed += ids.shape[1]
        size, outs = self._room, []
        for i in range(ids.shape[1]):
            self._window = torch.cat([self._held(size - 1), ids[:, i : i + 1]], dim=1)
            outs.append(self.model(input_ids=self._window, use_cache=False, logits_to_keep=1).logits)
        self.fed += ids.shape[1]
        return torch.cat(outs, dim=1)

    def _held(self, count: int) -> torch.Tensor:
        return self._window[:, -count:] if count > 0 else self._window[:, :0]

    def _feed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        from streambench.engine.exact_chunks import recompute_rows

        size = self._room
        held = self._held(size - 1)
        context = torch.cat([held, ids], dim=1)
        logits = recompute_rows(self.model, context, held.shape[1], size, self._rows_tokens)
        self._window = context[:, -size:]
        self.fed += ids.shape[1]
        return logits

    # ---- branches: the state is the window -----------------------------------------------------
    def reserve(self, count: int) -> None:
        pass  # nothing to evict: a branch rolls back by restoring the window

    def new_round(self) -> None:
        pass

    def compress(self, kept: int, reindex: bool | None = None) -> None:
        raise ConfigError(f"{self.policy.name} keeps no cache: there is nothing to compress once")

    def checkpoint(self) -> StreamState:
        return StreamState(self.fed, self.policy.state(), None, None, self._window)

    def rollback(self, state: StreamState) -> None:
        self.fed = state.fed
        self.policy.restore(state.policy)
        if state.window is not None:
            self._window = state.window

    def _branch_window(self) -> torch.Tensor | None:
        return self._window

    def _restore_window(self, window: torch.Tensor | None) -> None:
        if window is not None:
            self._window = window

    # ---- accounting: a transient cache of the window, built every step --------------------------
    def held_positions(self, stream: int = 0) -> np.ndarray:
        return np.arange(self.fed - self.kv_tokens, self.fed)

    @property
    def kv_tokens(self) -> int:
        return min(self._window.shape[1], self._room)

    @property
    def kv_bytes(self) -> int:
        return self.kv_tokens * self._token_bytes

    def layer_accounting(self) -> dict | None:
        return None

    @property
    def sliding_tokens(self) -> int:
        return 0

    @property
    def allocated_kv_bytes(self) -> int:
        return self._room * self._token_bytes
