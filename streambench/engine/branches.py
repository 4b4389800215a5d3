"""Several continuations of one state scored in one forward: a tree mask.

Multiple-choice scoring (SirLLM's dialogue replies, lm-eval's loglikelihood under a policy) feeds
each candidate from the same state and rolls back: N forwards of a few tokens, each reading the
whole cache. Here the candidates go in as one sequence, each token's mask row showing the held
tokens and its own candidate's earlier tokens only, at the positions it would have alone (every
candidate starts where the stream stands); so each candidate's logits equal its own forward's,
and the cache is read once. The session rolls the cache back afterwards, as after one candidate
(SpecInfer's token-tree verification, arXiv:2305.09781, uses the same mask for the same reason).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streambench.engine.routing import AttentionRoute, register

NAME = "streambench_tree"
_ACTIVE: list[TreeMask] = []


class TreeMask(AttentionRoute):
    """The mask of one tree forward: `held` cached keys every query sees, then the candidates of
    `lengths` tokens, one after another, each causal within itself and blind to the others."""

    def __init__(self, model, held: int, lengths: list[int], device):
        register(NAME, tree_attention)
        super().__init__(model, NAME, _ACTIVE)
        sizes = torch.tensor(lengths)
        owner = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
        self.local = torch.cat([torch.arange(n) for n in lengths])  # each token's index in its candidate
        own = (owner[:, None] == owner[None, :]) & (self.local[:, None] >= self.local[None, :])
        total = int(sizes.sum())
        self.mask = torch.cat([torch.ones(total, held, dtype=torch.bool), own], dim=1).to(device)
        self._rows: dict = {}

    def rows(self, device, groups: int) -> torch.Tensor:
        """The mask with one row block per query head of a KV group, on `device`."""
        key = (str(device), groups)
        if key not in self._rows:
            mask = self.mask.to(device)
            self._rows[key] = mask if groups == 1 else mask.repeat(groups, 1)
        return self._rows[key]


def tree_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """An attention function for `AttentionInterface`: SDPA under the tree's mask."""
    tree = _ACTIVE[-1]
    b, heads, c, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(b, kv_heads, groups * c, d)  # each KV head's query heads as one block (no repeated keys)
    out = F.scaled_dot_product_attention(
        q, key, value, attn_mask=tree.rows(query.device, groups), scale=scaling if scaling is not None else d**-0.5
    )
    return out.view(b, heads, c, -1).transpose(1, 2).contiguous(), None
