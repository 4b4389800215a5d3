"""Unequal budgets: what PyramidKV, AdaKV and DuoAttention share. The run's budget stays keys per
lane on average (so every policy at a budget holds the same total and the Pareto plot stays
fair); these helpers split `target x lanes` among layers and heads, and turn per-lane counts and
scores into the keep mask an `uneven` policy returns (policies/base.py, engine/contract.py).

A lane that keeps fewer tokens than others holds pads at its first ranks (`view.valid` False):
scores there are -inf so nothing keeps them, and a lane's "first tokens" (its sinks) are its
first valid ranks."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from streambench.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from streambench.policies.base import CacheView, ScoredPolicy


def fill(desired: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total` (or to sum(caps) when less), each <= its cap, as close
    to `desired` as the caps allow: water-filling, i.e. counts = min(cap, desired + t) for the
    largest integer t that fits, the remainder one each to the first unsaturated entries."""
    desired = np.asarray(desired, dtype=np.int64)
    caps = np.asarray(caps, dtype=np.int64)
    total = min(int(total), int(caps.sum()))
    low, high = -int(desired.max()) - 1, int(caps.max()) + 1  # sum(min(cap, max(d + t, 0))) is monotone in t
    while high - low > 1:
        mid = (low + high) // 2
        if np.minimum(caps, np.maximum(desired + mid, 0)).sum() <= total:
            low = mid
        else:
            high = mid
    counts = np.minimum(caps, np.maximum(desired + low, 0))
    short = total - int(counts.sum())
    if short:
        room = np.flatnonzero(counts < caps)[:short]
        counts[room] += 1
    return counts


def pyramid(target: int, layers: int, window: int, beta: float) -> np.ndarray:
    """PyramidKV's per-layer budgets with mean `target` (Cai et al., arXiv:2406.02069; the formula
    of KVCache-Factory `PyramidKVCluster.update_kv`, as kvpress `PyramidKVPress.get_layer_budget`):
    beyond the `window` every layer keeps, layer l keeps max_num - l * steps, an arithmetic
    sequence from max_num at the bottom to min_num = (target - window) / beta at the top, whose
    mean is target - window. Rounded by largest remainders so the total is exactly target x layers."""
    spare = target - window
    if spare <= 0 or layers == 1:
        return np.full(layers, target, dtype=np.int64)
    min_num = spare / beta
    max_num = 2 * spare - min_num
    steps = (max_num - min_num) / (layers - 1)
    exact = max_num - np.arange(layers) * steps + window
    counts = np.floor(exact).astype(np.int64)
    short = target * layers - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def protect(raw: Any, view: CacheView, sinks: int, recent: int) -> torch.Tensor | None:
    """A scorer's (L, H, n) or (L, n) scores as (L, H, n) floats with every lane's pads at -inf
    and its first `sinks` valid tokens and last `recent` tokens at +inf; None stays None (the
    scorer has nothing yet)."""
    import torch

    if raw is None:
        return None
    scores = torch.as_tensor(raw).float()
    L, H, n = view.num_layers, view.kv_heads, view.length
    if scores.dim() == 2:
        scores = scores[:, None].expand(L, H, n)
    scores = scores.clone()
    valid = torch.from_numpy(np.array(view.lane_valid)).to(scores.device)
    always = torch.zeros((L, H, n), dtype=torch.bool, device=scores.device)
    if sinks:
        always |= valid & (valid.cumsum(-1) <= sinks)
    if recent:
        always[..., n - min(recent, n) :] = True
    scores[always] = float("inf")
    scores[~valid] = float("-inf")
    return scores


def recent_mask(view: CacheView, counts: np.ndarray, sinks: int = 0) -> np.ndarray:
    """Each lane keeps its first `sinks` valid tokens and its most recent others, `counts` (L, H)
    in all: the keep mask of scorer-less lanes (DuoAttention's streaming heads)."""
    valid = view.lane_valid
    order = np.cumsum(valid, axis=-1)  # 1-based index of each valid token in its lane
    held = order[..., -1:]
    sink = np.minimum(sinks, counts)[..., None]
    return valid & ((order <= sink) | (order > held - (counts[..., None] - sink)))


def top_mask(scores: torch.Tensor, counts: np.ndarray) -> np.ndarray:
    """Each lane (l, h) keeps its `counts[l, h]` highest-scored ranks: a bool mask (L, H, n).
    Ties go to the older token (a stable sort over ranks)."""
    import torch

    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (place < torch.as_tensor(np.array(counts), device=scores.device)[..., None]).cpu().numpy()


def safeguard(mean: int, alpha: float) -> int:
    """AdaKV's per-head floor: int(alpha x mean), at least 1 when alpha and mean are positive."""
    floor = int(mean * alpha)
    return max(1, floor) if alpha > 0 and mean > 0 else floor


def pooled_counts(scores: torch.Tensor, mean: int, held: np.ndarray, alpha: float) -> np.ndarray:
    """AdaKV's allocation (kvpress `AdaKVPress.compress`): per layer, every head first keeps its
    top max(1, int(alpha x mean)) tokens, then the layer's pool of mean x heads places goes to the
    highest remaining scores over all its heads. (L, H) counts, each <= what the lane holds."""
    import torch

    L, H, n = scores.shape
    floor = safeguard(mean, alpha)
    floor_per_lane = torch.as_tensor(np.minimum(held, floor), device=scores.device)
    ranked = torch.sort(scores, dim=-1, descending=True, stable=True).values  # each head's, best first
    ranked = ranked.masked_fill(torch.arange(n, device=scores.device) < floor_per_lane[..., None], float("inf"))
    order = torch.sort(ranked.reshape(L, H * n), dim=-1, descending=True, stable=True).indices[:, : mean * H]
    chosen = torch.zeros((L, H * n), dtype=torch.long, device=scores.device).scatter_(1, order, 1)
    return np.minimum(chosen.view(L, H, n).sum(-1).cpu().numpy(), held)


def inner_scorer(owner: Any, name: str, budget: int) -> ScoredPolicy:
    """The scoring policy an uneven policy allocates over (`-p scorer=h2o`): any registered
    ScoredPolicy, built at the run's budget with its own defaults."""
    from streambench.policies import POLICIES
    from streambench.policies.base import ScoredPolicy
    from streambench.policies.build import PolicySpec, build_policy

    if not isinstance(name, str) or name not in POLICIES:
        raise ConfigError(
            f"{owner.name}: scorer must name a scoring policy (snapkv, h2o, tova, knorm, ...), got {name!r}"
        )
    cls = POLICIES.get(name)
    if not (isinstance(cls, type) and issubclass(cls, ScoredPolicy)) or getattr(cls, "uneven", False):
        raise ConfigError(
            f"{owner.name}: scorer {name!r} is not a policy that scores tokens (snapkv, h2o, tova, knorm, ...)"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    args = {k: 0 for k in ("start_size",) if k in fields}  # (the owner protects its own sinks)
    return build_policy(PolicySpec(name, args), budget)
