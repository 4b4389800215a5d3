"""knorm: keep the keys of lowest L2 norm, per layer and KV head."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import CacheView, ScoredPolicy, bottom_ranks

# Norms within this share of the largest count as tied. The same token's layer-0 keys are equal
# before RoPE; rotated at two positions (and back) their norms differ in the last bits, and by
# how much depends on the positions and on the batch's matrix kernels (a batch of streams, a
# group of policies). Exact twins must tie, and their tie go by rank, for a stream to keep the
# same tokens alone and batched.
TIE = 1e-5


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
    device_select = True
    batch_sensitive = (
        "its keep-set follows key norms that near-tie within float noise, which a batch's arithmetic "
        "reorders where a group's steps are not bit for bit as alone (not a CPU in fp32 whose GEMM "
        "passes models/few_rows.py's proof; 2,048 Hamlet tokens at budget 256: PPL 171.6 alone, 173.0 "
        "in such a group)"
    )
    start_size: int = 0
    recent_size: int = 0

    def score(self, view: CacheView):
        return -view.observed["key_norm"]

    def drop_lowest(self, scores, drop: int):
        """One token leaves (a stream's step): the newest of those whose norm is within TIE of the
        largest; more leave at once (a chunk, a turn): `bottom_ranks`."""
        import torch  # policies import no torch until they run

        if drop != 1:
            return bottom_ranks(scores, drop)
        low = scores.min(dim=-1, keepdim=True).values  # (scores are -norm; protected ones +inf)
        tied = scores <= low + TIE * low.abs()
        return (scores.shape[-1] - 1) - tied.flip(-1).to(torch.uint8).argmax(dim=-1, keepdim=True)  # the newest tied
