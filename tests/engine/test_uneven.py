"""Lanes keeping unequal counts (PyramidKV, AdaKV, DuoAttention): each (layer, KV head) attends over
exactly its own kept tokens, re-indexed as if alone, its pads never attended; the budget bounds the
mean count over lanes; memory is counted both ways."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from reference import ReferenceStream, fresh_logits
from tiny_models import ARCHITECTURES, tiny_model

from streambench.engine.observe import AttentionObserver
from streambench.engine.session import StreamSession
from streambench.errors import ConfigError, PolicyContractError
from streambench.models.loading import LoadedModel
from streambench.policies.base import CachePolicy

BUDGET = 10


@dataclass
class RaggedRandom(CachePolicy):
    """Random per-lane counts (each lane at least one token, at most what it holds) summing to
    exactly target x lanes, each lane a random subset of its own tokens: the hardest layouts."""

    name = "ragged-random"
    uneven = True
    seed: int = 0
    overspend: int = 0  # tokens kept beyond the mean budget (a broken policy)
    keep_pad: bool = False  # keep a pad (a broken policy)

    def configure(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def select(self, view):
        L, H, n = view.num_layers, view.kv_heads, view.length
        valid = np.broadcast_to(view.valid, (L, H, n)).reshape(L * H, n)
        held = valid.sum(-1)
        counts = np.minimum(held, 1)
        total = view.target * L * H + self.overspend
        while counts.sum() < total:
            room = np.flatnonzero(counts < held)
            counts[self._rng.choice(room)] += 1
        keep = np.zeros((L * H, n), dtype=bool)
        for r in range(L * H):
            keep[r, self._rng.choice(np.flatnonzero(valid[r]), counts[r], replace=False)] = True
        if self.keep_pad and (~valid).any():
            r, c = np.argwhere(~valid)[0]
            keep[r, np.flatnonzero(keep[r])[0]] = False  # (the count stays: only the pad is wrong)
            keep[r, c] = True
        return keep.reshape(L, H, n)


def session_for(model, budget=BUDGET, batch=1, **args):
    lm = LoadedModel.wrap(model)
    policy = RaggedRandom(budget=budget, **args)
    if not lm.layout.routable:
        with pytest.raises(ConfigError, match="AttentionInterface"):
            StreamSession(lm, policy)
        return None
    return StreamSession(lm, policy, batch_size=batch)


def stream_ids(n, seed=1, batch=1):
    return torch.randint(3, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ragged_lanes_equal_a_fresh_per_head_computation_to_1e6(arch):
    """One layer: each head's output equals eager attention over exactly its own kept tokens
    (no padding anywhere in the reference), after every step."""
    model = tiny_model(arch, layers=1)
    session = session_for(model, seed=1)
    if session is None:
        return
    ids = stream_ids(36, seed=8)
    ragged = 0
    for t in range(ids.shape[1]):
        logits = session.feed(ids[:, t : t + 1])[0, -1]
        ragged += session.cache.ragged
        if t >= BUDGET:
            kept = session.cache.positions
            torch.testing.assert_close(logits, fresh_logits(model, ids[:, : t + 1], kept), atol=1e-6, rtol=0)
    assert ragged > 12  # (the layouts really were ragged)


def test_pads_attended_would_be_caught(monkeypatch):
    """The check above can fail: with the pad mask switched off, the logits leave the reference."""
    model = tiny_model("llama", layers=1)
    monkeypatch.setattr(AttentionObserver, "allowed", lambda self, layer, n: None)
    session = session_for(model, seed=1)
    ids = stream_ids(24, seed=8)
    worst = 0.0
    for t in range(ids.shape[1]):
        logits = session.feed(ids[:, t : t + 1])[0, -1]
        if t >= BUDGET and session.cache.ragged:
            want = fresh_logits(model, ids[:, : t + 1], session.cache.positions)
            worst = max(worst, float((logits - want).abs().max()))
    assert worst > 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_deep_ragged_cache_equals_the_reference_replaying_its_lanes(arch):
    """Three layers: the engine (pads, per-lane slots, one offset per stream, re-rotation) equals
    the reference rebuilding every head of every layer from its own kept states."""
    model = tiny_model(arch, layers=3)
    session = session_for(model, seed=2)
    if session is None:
        return
    reference = ReferenceStream(model, None)
    ids = stream_ids(40, seed=2)
    for t in range(ids.shape[1]):
        got = session.feed(ids[:, t : t + 1])
        want = reference.feed(ids[:, t : t + 1], keep_positions=session.cache.positions[..., :-1])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_chunks_batches_and_ragged_budgets_in_chunks():
    """Multi-token chunks (a dialogue turn) and two streams in one batch: each chunk's causal mask
    combined with the pads; each stream equal to the reference."""
    model = tiny_model("qwen2", layers=2)
    session = session_for(model, budget=16, batch=2, seed=3)
    refs = [ReferenceStream(model, None) for _ in range(2)]
    ids = stream_ids(80, seed=3, batch=2)
    at = 0
    for size in [1, 3, 5, 2, 7, 4] * 5:
        if at >= ids.shape[1]:
            break
        chunk = ids[:, at : at + size]
        got = session.feed(chunk)
        for b, ref in enumerate(refs):
            replay = session.cache.positions_of(b)[..., : -chunk.shape[1]]
            want = ref.feed(chunk[b : b + 1], keep_positions=replay)
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-4, rtol=0)
        at += size
    assert session.cache.ragged


def test_rollback_and_fork_on_a_ragged_cache():
    """Branches from a ragged cache: a rolled-back branch leaves no trace; a fork may evict
    (ragged again) and the stream goes on as if it never ran."""
    model = tiny_model("llama", layers=2)
    main, plain = session_for(model, seed=4), session_for(model, seed=4)
    ids = stream_ids(40, seed=5)
    for t in range(20):
        main.feed(ids[:, t : t + 1])
        plain.feed(ids[:, t : t + 1])
    assert main.cache.ragged
    main.reserve(3)
    plain.reserve(3)
    state = main.checkpoint()
    main.feed(ids[:, 30:33])
    main.rollback(state)
    with main.fork():
        for t in range(25, 35):
            main.feed(ids[:, t : t + 1])
    for t in range(20, 30):
        torch.testing.assert_close(main.feed(ids[:, t : t + 1]), plain.feed(ids[:, t : t + 1]), atol=0, rtol=0)
    np.testing.assert_array_equal(main.cache.positions, plain.cache.positions)


def test_mean_budget_and_memory_both_ways():
    """The mean count over lanes never passes the budget; logical bytes count the tokens the
    lanes keep (from the cache's own positions), physical bytes every layer at its longest lane."""
    model = tiny_model("llama", layers=3)
    session = session_for(model, seed=6)
    info = session.lm.info
    lane_bytes = 2 * info.head_dim * 4  # fp32 K and V of one token in one lane
    ids = stream_ids(40, seed=6)
    for t in range(ids.shape[1]):
        session.feed(ids[:, t : t + 1])
        cache = session.cache
        positions = np.broadcast_to(cache.positions, (cache.num_layers, cache.kv_heads, cache.length))
        kept = positions >= 0
        assert kept.sum() / (positions.shape[0] * positions.shape[1]) <= BUDGET
        assert session.kv_bytes == int(kept.sum()) * lane_bytes
        layer_longest = kept.sum(-1).max(-1)  # (L,)
        assert session.physical_kv_bytes == int(layer_longest.sum()) * cache.kv_heads * lane_bytes
        assert session.kv_tokens <= BUDGET
    assert session.physical_kv_bytes > session.kv_bytes  # (ragged at the end)


@dataclass
class Pyramid(RaggedRandom):
    """Layer l keeps (L - l) x what the top layer keeps, per head a random share of it: layers far
    apart in length, so the lower ones hold slots the upper ones do not."""

    name = "ragged-pyramid"

    def select(self, view):
        L, H, n = view.num_layers, view.kv_heads, view.length
        valid = np.broadcast_to(view.valid, (L, H, n))
        weights = np.arange(L, 0, -1, dtype=float)
        per_layer = np.floor(view.target * L * weights / weights.sum()).astype(int)
        keep = np.zeros((L, H, n), dtype=bool)
        for layer in range(L):
            for h in range(H):
                mine = np.flatnonzero(valid[layer, h])
                count = min(len(mine), max(1, per_layer[layer] - self._rng.integers(0, 2)))
                keep[layer, h, self._rng.choice(mine, count, replace=False)] = True
        return keep


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3", "gpt_neox"])
def test_each_layer_holds_its_own_capacity_and_stays_exact(arch):
    """A ragged cache sizes each layer's buffers to what that layer holds (PyramidKV's memory is
    real, not padded to the bottom layer's length), and attention stays exact: the deep
    reference replaying the engine's lanes, after every step, through rollback and fork."""
    model = tiny_model(arch, layers=4)
    session = StreamSession(LoadedModel.wrap(model), Pyramid(budget=12, seed=3))
    reference = ReferenceStream(model, None)
    ids = stream_ids(60, seed=4)
    for t in range(ids.shape[1]):
        if t == 40:
            session.reserve(3)
            state = session.checkpoint()
            session.feed(ids[:, :3])
            session.rollback(state)
            with session.fork():
                session.feed(ids[:, 5:9])
        got = session.feed(ids[:, t : t + 1])
        want = reference.feed(ids[:, t : t + 1], keep_positions=session.cache.positions[..., :-1])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    cache = session.cache
    assert cache.split and cache.ragged
    held = [int(h) for h in cache._len]
    assert held[0] >= 1.5 * held[-1]
    for layer, shard in enumerate(cache.shards):
        assert (shard.start, shard.stop) == (layer, layer + 1)
        assert shard.k.shape[3] == shard.capacity <= held[layer] + held[layer] // 2 + 16
        lanes = cache._slot.reshape(cache.num_layers, 1, cache.kv_heads, -1)[layer, 0, :, : cache.length]
        assert lanes.max() < held[layer]  # every slot it uses lies in its own buffer
    rectangular = cache.num_layers * cache.length * cache.kv_heads * cache.head_dim * 4
    physical = sum(held) * cache.kv_heads * cache.head_dim * 4
    assert cache.physical_kv_bytes() == 2 * physical + cache.sliding_bytes()
    assert physical < 0.8 * rectangular


@pytest.mark.parametrize(
    "args,message",
    [
        ({"overspend": 1}, r"kept 9\.17 tokens per lane on average, more than the 9"),
        ({"keep_pad": True}, "kept a pad"),
    ],
)
def test_a_policy_that_breaks_the_mean_budget_is_one_error_naming_it(args, message):
    model = tiny_model("llama", layers=3)
    session = session_for(model, **args)
    ids = stream_ids(30, seed=7)
    with pytest.raises(PolicyContractError, match=f"policy ragged-random: select\\(\\) {message}"):
        for t in range(ids.shape[1]):
            session.feed(ids[:, t : t + 1])


def test_only_an_uneven_policy_may_return_a_mask():
    @dataclass
    class Even(RaggedRandom):
        name = "even-mask"
        uneven = False

    session = StreamSession(LoadedModel.wrap(tiny_model("llama", layers=1)), Even(budget=BUDGET))
    with pytest.raises(PolicyContractError, match="only a policy declaring `uneven` may"):
        for t in range(20):
            session.feed(stream_ids(20)[:, t : t + 1])


def test_a_lane_below_its_declared_floor_is_one_error_naming_it():
    """A policy's declared (floor, cap) per lane holds at every eviction (AdaKV's safeguard)."""

    @dataclass
    class Floored(RaggedRandom):
        name = "floored"

        def lane_limits(self, view):
            return view.target + 1, None  # (more than the mean: some lane must fall below)

    session = StreamSession(LoadedModel.wrap(tiny_model("llama", layers=3)), Floored(budget=BUDGET, seed=9))
    with pytest.raises(
        PolicyContractError,
        match=r"policy floored: select\(\) kept \d tokens in layer \d, KV head \d, below its declared floor \d+",
    ):
        for t in range(30):
            session.feed(stream_ids(30)[:, t : t + 1])

    @dataclass
    class Capped(RaggedRandom):
        name = "capped"

        def lane_limits(self, view):
            return None, view.target - 1  # (less than the mean: some lane must pass it)

    session = StreamSession(LoadedModel.wrap(tiny_model("llama", layers=3)), Capped(budget=BUDGET, seed=9))
    with pytest.raises(PolicyContractError, match="above its declared cap"):
        for t in range(30):
            session.feed(stream_ids(30)[:, t : t + 1])
