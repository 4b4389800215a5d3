"""The keys a policy is shown: at ranks 0..n-1 (`keys`), as the cache holds them (`held_keys`,
rank + the stream's offset) and by shape alone (`key_shape`). The first is computed from the held
keys by one common turn (`RotaryTable.shift`); it must equal the keys rotated afresh from their
pre-RoPE copies at their ranks, on every architecture (rotate-half, interleaved, partial rotary,
scaled tables), after per-head evictions have moved the offset."""

from dataclasses import dataclass

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from streambench.engine.session import StreamSession
from streambench.models.loading import LoadedModel
from streambench.policies.base import ScoredPolicy


@dataclass
class Recorder(ScoredPolicy):
    """Per-head seeded scores (keep-sets differ by head, so offsets and stale keys arise); records
    every view's keys."""

    observes = frozenset({"keys", "held_keys", "key_shape"})
    seen: list | None = None

    def score(self, view):
        if self.seen is None:
            self.seen = []
        self.seen.append({name: view.observed[name] for name in self.observes} | {"n": view.length})
        generator = torch.Generator().manual_seed(view.length * 7 + len(self.seen))
        return torch.rand(view.num_layers, view.kv_heads, view.length, generator=generator)


def _session(arch):
    model = tiny_model(arch, layers=2)
    return StreamSession(LoadedModel.wrap(model), Recorder(budget=10))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keys_at_ranks_equal_the_pre_rope_keys_rotated_afresh(arch):
    session = _session(arch)
    if session.cache is None or session.cache.rope is None:
        pytest.skip(f"{arch}: no re-indexing cache")
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    offsets = []
    for t in range(40):
        session.feed(ids[:, t : t + 1])
        if session.cache.per_head:
            c = session.cache
            rope = c.reindexing()
            afresh = rope.rotate(c.ranked_pre_keys(0), torch.arange(c.length))
            view = session.view(0)
            torch.testing.assert_close(view.observed["keys"], afresh, rtol=1e-5, atol=1e-5)
            held, offset = view.observed["held_keys"]
            assert offset == c.offset_of(0)
            torch.testing.assert_close(held, c.ranked_keys(0), rtol=0, atol=0)
            shape = view.observed["key_shape"]
            assert shape.shape == afresh.shape and shape.dtype == afresh.dtype
            assert shape.stride() == (0, 0, 0, 0)  # (expanded from one value: no memory)
            offsets.append(offset)
    assert any(o != 0 for o in offsets), f"{arch}: no eviction moved the offset; the test shows nothing"
    assert session.policy.seen  # the policy was shown these views at its evictions


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "yarn-scaled"])
@pytest.mark.parametrize("delta", [-37, -1, 1, 5, 300])
def test_shift_is_a_rotation_by_delta_positions(delta, scaled):
    model = tiny_model("llama", layers=2, **({"rope_parameters": YARN} if scaled else {}))
    session = StreamSession(LoadedModel.wrap(model), Recorder(budget=10))
    rope = session.cache.reindexing()
    rope.ensure(1000)
    assert (rope.inv_norm is not None) == scaled  # (yarn's attention factor scales the tables)
    pre = torch.randn(2, 3, 7, session.cache.head_dim)
    start = torch.arange(400, 407)
    held = rope.rotate(pre, start)
    # (fp32 tables at positions ~400-700 are each off by ~position x eps in the angle: 1e-4, where
    # a wrong angle or sign is off by O(1))
    torch.testing.assert_close(rope.shift(held, delta), rope.rotate(pre, start + delta), rtol=1e-4, atol=1e-4)
    assert rope.shift(held, 0) is held
