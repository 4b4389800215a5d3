"""recompute-window: re-encode the last `size` tokens from scratch for every new token."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.window import WindowPolicy


@register_policy("recompute-window")
@dataclass
class RecomputeWindowPolicy(WindowPolicy):
    """Sliding window with re-computation (StreamingLLM, arXiv:2309.17453, Fig. 1c): every step
    runs a fresh forward over the window, so each query sees a clean prefix starting at position 0.
    The quality baseline for a fixed budget, at O(size^2) work per token. Same sizes as `window`;
    the session keeps no cache for it."""

    summary = "re-encode the last `size` tokens every step (quality baseline, O(size^2)/token)"
    recompute = True
