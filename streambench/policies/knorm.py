"""knorm: keep the keys of lowest L2 norm, per layer and KV head."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import CacheView, ScoredPolicy


@register_policy("knorm")
@dataclass
class KnormPolicy(ScoredPolicy):
    """K-norm (Devoto et al., arXiv:2406.11430, "A Simple and Effective L2 Norm-Based Strategy for
    KV Cache Compression"): keys with a low L2 norm draw high attention, so keeping the lowest-norm
    keys approximates attention-based eviction without reading any attention (it works with every
    attention kernel). Per layer and KV head, as kvpress's KnormPress (score = -||k||). The norm is
    the cached key's (RoPE is a rotation, so pre- and post-RoPE norms agree), recorded when the
    token enters. `start_size` sinks and `recent_size` newest tokens are optionally protected
    (default 0 and 0, the paper's setting)."""

    summary = "lowest key L2 norm, per layer and KV head (+ optional sinks, recent window)"
    observes = frozenset({"key_norm"})
    start_size: int = 0
    recent_size: int = 0

    def score(self, view: CacheView):
        return -view.observed["key_norm"]
