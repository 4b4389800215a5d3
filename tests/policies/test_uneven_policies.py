"""pyramidkv, adakv and duo: their allocations on planted values, their streams exact against the
reference replaying each lane, and the mean budget held at every step."""

import numpy as np
import pytest
import torch
from reference import ReferenceStream, fresh_logits
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies.allocation import fill, pyramid
from streambench.policies.base import CacheView
from streambench.policies.build import PolicySpec, build_policy
from streambench.policies.kvpress_bridge import import_kvpress

CASES = [
    ("pyramidkv", {}),
    ("pyramidkv", {"scorer": "h2o"}),
    ("adakv", {}),
    ("adakv", {"scorer": "knorm", "alpha": 0.5}),
    ("duo", {}),
]
IDS = ["pyramidkv", "pyramidkv-h2o", "adakv", "adakv-knorm", "duo"]


def make(name, args, budget=16):
    return build_policy(PolicySpec(name, dict(args)), budget)


def test_pyramid_schedule_is_kvcache_factorys_with_an_exact_mean():
    """Budget 128, window 32, beta 20, 30 layers: the top layer keeps 32 + 96/20, the bottom
    32 + 2*96 - 96/20, linear in between (KVCache-Factory's max_num/min_num), summing to 128 x 30."""
    counts = pyramid(128, 30, 32, 20)
    exact = 32 + (192 - 4.8) - np.arange(30) * (192 - 9.6) / 29
    assert counts.sum() == 128 * 30
    assert np.abs(counts - exact).max() < 1
    assert (np.diff(counts) <= 0).all() and counts[0] == 219 and counts[-1] in (36, 37)
    assert (pyramid(8, 4, 8, 20) == 8).all()  # (no room beyond the window: flat)


def test_fill_waters_up_to_the_caps():
    assert fill(np.array([10, 5, 1]), np.array([4, 100, 100]), 16).tolist() == [4, 8, 4]
    assert fill(np.array([3, 3]), np.array([2, 2]), 10).tolist() == [2, 2]  # (caps bind: all they hold)
    assert fill(np.array([5, 5, 5]), np.array([9, 9, 9]), 16).sum() == 16


def test_pyramidkv_cuts_the_pyramid_at_what_each_layer_holds():
    """At the first eviction every layer holds the same: the bottom layers cannot keep more, so
    the others water-fill the mean; the full pyramid comes once the lower layers grew."""
    policy = make("pyramidkv", {"window": 2}, budget=16)
    view = CacheView(16, 1, 16, np.arange(16), np.zeros(16), {}, num_layers=4, kv_heads=2)
    counts = policy.counts(view, 15)
    assert counts.shape == (4, 2) and counts.sum() == 15 * 8 and counts.max() <= 16
    held = np.stack([np.arange(32)] * 8).reshape(4, 2, 32)
    view = CacheView(32, 1, 16, held, np.zeros((4, 2, 32)), {}, num_layers=4, kv_heads=2)
    np.testing.assert_array_equal(policy.counts(view, 15)[:, 0], pyramid(15, 4, 2, 20))


def test_adakv_pools_a_layer_over_its_heads_with_a_floor():
    """A peaked head and a flat one: the pool goes to the peaked head's top scores, the flat head
    keeps its floor (alpha x budget, at least one)."""
    policy = make("adakv", {"alpha": 0.25}, budget=16)
    peaked = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0.0])
    scores = torch.stack([peaked, torch.full((10,), 0.5)])[None]  # (1 layer, 2 heads, 10)
    assert policy.allocate(scores, 4, np.array([[10, 10]])).tolist() == [[7, 1]]
    assert policy.allocate(scores, 4, np.array([[10, 10]])).sum() == 8
    policy = make("adakv", {"alpha": 1.0}, budget=16)  # floor = the whole budget: even
    assert policy.allocate(scores, 4, np.array([[10, 10]])).tolist() == [[4, 4]]


def test_duo_splits_heads_by_a_planted_pattern(tmp_path):
    """DuoAttention's released format (layers x KV heads, tab-separated): the highest gates are
    retrieval heads; streaming lanes keep sinks + recent, retrieval lanes what the mean leaves."""
    gates = np.array([[0.9, 0.1], [0.2, 0.8], [0.05, 0.3], [0.7, 0.0]])
    (tmp_path / "full_attention_heads.tsv").write_text("\n".join("\t".join(map(str, r)) for r in gates))
    policy = make("duo", {"pattern": str(tmp_path), "retrieval_share": 0.5, "sink_size": 2, "streaming_size": 6})
    assert policy.observes == frozenset()
    view = CacheView(40, 1, 16, np.arange(40), np.zeros(40), {}, num_layers=4, kv_heads=2)
    keep = policy.select(view)
    retrieval = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=bool)
    np.testing.assert_array_equal(policy._retrieval, retrieval)
    counts = keep.sum(-1)
    assert (counts[~retrieval] == 5).all() and counts.sum() == 15 * 8
    assert (counts[retrieval] == (15 * 8 - 4 * 5) // 4).all()
    streaming = keep[0, 1]
    np.testing.assert_array_equal(np.flatnonzero(streaming), [0, 1, 37, 38, 39])


def test_duo_finds_the_far_reading_head_on_the_fly():
    """No pattern: the lane whose window attention falls outside sinks + recent is a retrieval head."""
    policy = make("duo", {"retrieval_share": 0.25, "sink_size": 1, "streaming_size": 3, "window": 2})
    n = 12
    attn = torch.zeros(2, 2, 1, 2, n)
    attn[..., -1] = 1.0  # every head reads its newest token ...
    attn[1, 0, :, :, 5] = 1.0  # ... but layer 1, head 0 reads far back
    attn[1, 0, :, :, -1] = 0.0
    view = CacheView(n, 1, 8, np.arange(n), np.zeros(n), {"window_attention": attn}, num_layers=2, kv_heads=2)
    policy.select(view)
    np.testing.assert_array_equal(policy._retrieval, [[False, False], [True, False]])


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("pyramidkv", {"beta": 0.5}, "beta must be a number >= 1"),
        ("adakv", {"alpha": 2}, r"alpha must be a number in \[0, 1\]"),
        ("adakv", {"scorer": "streamingllm"}, "is not a policy that scores tokens"),
        ("pyramidkv", {"scorer": "nope"}, "scorer must name a scoring policy"),
        ("duo", {"retrieval_share": 1.5}, r"retrieval_share must be a number in \[0, 1\]"),
        ("duo", {"streaming_size": 40}, "streaming_size must be above sink_size 4 and at most the budget 16"),
        ("duo", {"pattern": "/no/such/pattern.tsv"}, "duo: cannot read the head pattern /no/such/pattern.tsv"),
    ],
)
def test_bad_values_are_one_line(name, args, message):
    with pytest.raises(ConfigError, match=message):
        make(name, args)


def test_a_pattern_for_another_model_is_refused(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("0.5\t0.5\n0.1\t0.9\n")
    policy = make("duo", {"pattern": str(path)})
    with pytest.raises(
        ConfigError, match=r"has 2 layers x 2 heads; this model has 3 full-attention layers x 2 KV heads"
    ):
        StreamSession(LoadedModel.wrap(tiny_model("qwen2", layers=3)), policy)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text", "phi3"])
@pytest.mark.parametrize("name,args", CASES, ids=IDS)
def test_uneven_policies_equal_the_reference_per_lane(arch, name, args):
    """Each lane of every layer attends over exactly its own kept tokens (the reference rebuilds
    every head from its own states), and the mean count never passes the budget."""
    model = tiny_model(arch, layers=3)
    session = StreamSession(LoadedModel.wrap(model), make(name, args))
    reference = ReferenceStream(model, None)
    ids = torch.randint(3, 96, (1, 56), generator=torch.Generator().manual_seed(4))
    for t in range(ids.shape[1]):
        got = session.feed(ids[:, t : t + 1])
        want = reference.feed(ids[:, t : t + 1], keep_positions=session.cache.positions[..., :-1])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert session.cache.mean_length <= 16
    assert session.cache.per_head


@pytest.mark.parametrize("name,args", CASES, ids=IDS)
def test_one_layer_uneven_streams_equal_a_fresh_per_head_computation(name, args):
    model = tiny_model("qwen2", layers=1)
    session = StreamSession(LoadedModel.wrap(model), make(name, args))
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(6))
    for t in range(ids.shape[1]):
        logits = session.feed(ids[:, t : t + 1])[0, -1]
        if t >= 16:
            want = fresh_logits(model, ids[:, : t + 1], session.cache.positions)
            torch.testing.assert_close(logits, want, atol=1e-6, rtol=0)


def test_pyramidkv_reaches_its_pyramid_and_holds_only_what_each_layer_keeps():
    """A long enough stream: lower layers hold more than upper ones, the mean stays the budget,
    and each layer's buffers are its own length: physical bytes (a layer's lanes at its longest)
    equal the logical ones, as the layer's heads keep alike, and what is allocated follows."""
    model = tiny_model("llama", layers=4)
    session = StreamSession(LoadedModel.wrap(model), make("pyramidkv", {}, budget=16))
    ids = torch.randint(3, 96, (1, 80), generator=torch.Generator().manual_seed(2))
    for t in range(ids.shape[1]):
        session.feed(ids[:, t : t + 1])
    counts = session.cache.lane_counts()[:, 0, 0]
    assert (np.diff(counts) < 0).all() and counts.mean() <= 16
    assert session.physical_kv_bytes == session.kv_bytes
    cache = session.cache
    capacities = np.array([shard.capacity for shard in cache.shards])
    assert len(capacities) == len(counts) and (capacities <= counts + counts // 2 + 16).all()


@pytest.mark.parametrize(
    "press,args",
    [
        ("AdaKVPress", {"press": "SnapKVPress(window_size=4)"}),
        ("AdaKVPress", {"press": "KnormPress", "alpha_safeguard": 0.5}),
        ("CriticalAdaKVPress", {"press": "SnapKVPress(window_size=4)", "first_stage_ratio": 0.3}),
        ("PerLayerCompressionPress", {"press": "KnormPress", "compression_ratios": [0.2, 0.5, 0.8]}),
        ("PyramidKVPress", {"window_size": 4}),
    ],
)
def test_kvpress_uneven_wrappers_stream_exactly(press, args):
    """kvpress's AdaKVPress and PyramidKVPress through the same machinery: unequal counts per
    lane, the mean at the budget, every lane equal to the reference rebuilding it."""
    try:
        import_kvpress()  # (the bridge's import: it takes kvpress's attention patch back)
    except ConfigError:
        pytest.skip("kvpress is not installed (./install.sh kvpress)")
    model = tiny_model("qwen2", layers=3)
    policy = build_policy(PolicySpec(f"kvpress:{press}", dict(args)), 16)
    assert policy.uneven
    session = StreamSession(LoadedModel.wrap(model), policy)
    reference = ReferenceStream(model, None)
    ids = torch.randint(3, 96, (1, 48), generator=torch.Generator().manual_seed(5))
    ragged = 0
    for t in range(ids.shape[1]):
        got = session.feed(ids[:, t : t + 1])
        want = reference.feed(ids[:, t : t + 1], keep_positions=session.cache.positions[..., :-1])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert session.cache.mean_length <= 16
        ragged += session.cache.ragged
    assert ragged
