"""sirllm: keep the start tokens, the tokens of highest (decayed) token entropy, then recent ones."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streambench.policies import register_policy
from streambench.policies.base import CachePolicy, CacheView

SCORES = ("surprisal", "upstream")


@register_policy("sirllm")
@dataclass
class SirLLMPolicy(CachePolicy):
    """SirLLM (Yao, Li, Zhao, arXiv:2405.12528). Tokens the model found surprising carry the
    information a conversation must remember (names, numbers, choices); keeping the highest
    token-entropy ones gives a streaming model memory beyond its window, and multiplying stored
    scores by `decay` each user turn lets old key tokens fade.

    Selection follows Zoeyyao27/SirLLM `evict_for_space_token_entropy`: with n incoming tokens it
    keeps the top (entropy_size - n) scores over the whole cache, the start tokens, then the most
    recent tokens until budget - n are kept (stable order breaks ties toward older tokens).
    Scores: `surprisal` (default) is the paper's e_i = -log p(x_i | x_<i), taken from the forward
    that fed the previous token. `upstream` reproduces the released code, whose stored score for
    token j is -log p(x_{j-1} | x_<=j-1) with each chunk's first token given the chunk's maximum
    (see FACTS: it is not the paper's definition). Defaults match the released scripts:
    recent_size 0, entropy_size = budget - start_size."""

    summary = "start tokens + highest token-entropy tokens (decayed per turn) + recent fill"
    start_size: int = 4
    entropy_size: int | None = None
    recent_size: int = 0
    decay: float = 1.0
    score: str = "surprisal"
    observes = frozenset({"logits"})
    device_select = True
    _prev_logprobs: object = field(default=None, init=False, repr=False, compare=False)  # (B, vocab)

    sizes = ("entropy_size", "recent_size")

    def configure(self) -> None:
        self._check_int("start_size", 0)
        self._check_int("recent_size", 0)
        given = self.entropy_size is not None
        self._split_budget(
            {"start_size": self.start_size, "recent_size": self.recent_size}, "entropy_size", minimum=0 if given else 1
        )
        self._require(self.budget > self.start_size, "needs room beyond the start tokens")
        self._require(
            isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0,
            f"decay must be in (0, 1], got {self.decay!r}",
        )
        self.decay = float(self.decay)
        self._require(self.score in SCORES, f"score must be one of {', '.join(SCORES)}, got {self.score!r}")

    def reset(self) -> None:
        self._prev_logprobs = None

    def state(self):
        return self._prev_logprobs

    def restore(self, state) -> None:
        self._prev_logprobs = state

    def score_tokens(self, ids, logits) -> np.ndarray:
        """Per-token scores (B, c) from the logits the forward produced anyway."""
        return self.score_tokens_on_device(ids, logits).cpu().numpy()

    def score_tokens_on_device(self, ids, logits):
        """`score_tokens`, left on the logits' device as float64 (a device-side step)."""
        import torch

        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, c, vocab)
        if self.score == "upstream":
            # Zoeyyao27/SirLLM _cal_selfinfo: the log-prob each position gives its *own* token,
            # shifted right by one, the chunk's maximum in front.
            own = -logprobs.gather(2, ids[..., None])[..., 0]
            scores = torch.cat([own.max(dim=1, keepdim=True).values, own[:, :-1]], dim=1)
        else:  # the paper's e_i = -log p(x_i | x_<i); the first token's from the previous forward
            nxt = -logprobs[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
            if self._prev_logprobs is not None:
                first = -self._prev_logprobs.gather(1, ids[:, :1])
            else:
                first = nxt.new_zeros(ids.shape[0], 1)
            scores = torch.cat([first, nxt], dim=1)
            self._prev_logprobs = logprobs[:, -1]
        return scores.double()

    def select(self, view: CacheView) -> np.ndarray:
        target = view.target
        keep = np.zeros(view.length, dtype=bool)
        keep[: min(self.start_size, view.length)] = True
        top = self.entropy_size - view.incoming
        if top > 0:
            keep[np.argsort(-view.scores, kind="stable")[:top]] = True
        missing = target - int(keep.sum())
        if missing > 0:  # fill with the most recent tokens not yet kept
            candidates = np.flatnonzero(~keep)
            keep[candidates[-missing:]] = True
        return np.flatnonzero(keep)

    def dropped(self, view: CacheView):
        """`select`'s complement computed on the device from the scores held there (a step that
        never waits on it): the same start tokens, stable top-k (ties: the older stays) and
        recent fill, as fixed-shape tensor ops."""
        import torch

        scores = view.scores  # (n,) float64 on the device
        n, target = view.length, view.target
        keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
        keep[: min(self.start_size, n)] = True
        top = self.entropy_size - view.incoming
        if top > 0:
            keep[torch.sort(-scores, stable=True).indices[:top]] = True
        missing = target - keep.sum()  # (a device scalar)
        free = ~keep
        after = free.flip(0).cumsum(0).flip(0)  # free ranks at or after each rank
        keep |= free & (after <= missing)  # the most recent free ones fill up to the target
        return torch.sort(keep.to(torch.uint8), stable=True).indices[: max(n - target, 0)]

    def new_round(self, scores: np.ndarray) -> np.ndarray:
        return scores * self.decay if self.decay != 1.0 else scores
