"""tova: keep the tokens the most recent query attends to most, one keep-set per layer."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import CacheView, ScoredPolicy


@register_policy("tova")
@dataclass
class TOVAPolicy(ScoredPolicy):
    """TOVA (Oren et al., arXiv:2401.06104, "Transformers are Multi-State RNNs"): when the cache is
    full, drop the token the current query attends to least, its weights averaged over all heads of
    the layer, so every layer keeps its own set (schwartz-lab-NLP/TOVA). No protected window: the
    newest token competes like any other (it usually wins). Here "the current query" is the last
    fed token's, whose attention was recorded during its own forward; a chunk of c tokens evicts c
    at once by the same scores. `start_size` (default 0, the paper's setting) optionally protects
    sinks."""

    summary = "tokens the last query attends to most (averaged over heads), per layer"
    observes = frozenset({"attention_last"})
    device_select = True
    start_size: int = 0

    def score(self, view: CacheView):
        return view.observed["attention_last"].mean(dim=1)  # (L, n): every query head of the layer
