"""dense: keep every token at its original position. The quality ceiling and the memory floor."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.policies import register_policy
from streambench.policies.base import Band, BandPolicy


@register_policy("dense")
@dataclass
class DensePolicy(BandPolicy):
    """Full attention over the whole stream: the cache grows without bound and, past the model's
    trained context, positions it never saw make perplexity explode (StreamingLLM, Fig. 1a)."""

    summary = "keep everything (no budget; cache grows with the stream)"
    device_select = False  # (it never evicts)

    def configure(self) -> None:
        self.budget = None  # a budget means nothing here; recorded as unbounded

    @property
    def band(self) -> Band:
        return Band()
