"""A group: one stream fed to B policies as one batch, each stream evicting by its own policy,
gives each policy's logits and keep-sets alone (to float tolerance), whatever the policies' mix
of keep-set forms (one set, per layer, per head) and of eviction times; bit for bit where the
streams evict in step on a CPU whose GEMM allows it (models/few_rows.py)."""

import numpy as np
import pytest
import torch
from test_exactness import BUDGET, POLICY_CASES, make_policy, stream_ids
from tiny_models import tiny_model

from streambench.engine.session import StreamSession, join_keeps, ungroupable
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel

GROUPABLE = [(n, a) for n, a in POLICY_CASES if n not in ("dense", "recompute-window", "longmem")]


def distinct(n, vocab=96, seed=7):
    """Distinct tokens: a repeated token's layer-0 key ties exactly with its twin's (knorm's
    score), and batched arithmetic may break such a tie the other way."""
    return (torch.randperm(vocab - 3, generator=torch.Generator().manual_seed(seed))[:n] + 3)[None]


def run(session, ids, chunk, rounds=False):
    out = []
    for i in range(0, ids.shape[1], chunk):
        out.append(session.feed(ids[:, i : i + chunk]))
        if rounds and i % 20 == 19:
            session.new_round()
    return torch.cat(out, dim=1), [session.held_positions(b).copy() for b in range(session.batch)]


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_group_equals_each_policy_alone(arch, chunk):
    lm = LoadedModel.wrap(tiny_model(arch, layers=2))
    ids = distinct(60)
    group = [make_policy(n, a) for n, a in GROUPABLE]
    with StreamSession(lm, group[0], group=group) as together:
        assert together.batch == len(group) and together.exact_chunks is not None
        logits, kept = run(together, ids.expand(len(group), -1), chunk, rounds=True)
        tallies = together.streams_kv()
    for b, (name, args) in enumerate(GROUPABLE):
        with StreamSession(lm, make_policy(name, args)) as alone:
            single, single_kept = run(alone, ids, chunk, rounds=True)
            torch.testing.assert_close(logits[b : b + 1], single, atol=2e-5, rtol=0, msg=f"{name} {args}")
            np.testing.assert_array_equal(kept[b], single_kept[0], err_msg=f"{name} {args}")
            assert tallies[b] == (alone.kv_tokens, alone.kv_bytes), (name, args)


LOCKSTEP = [  # (policies that evict one token per step: their cache stays rectangular in a group)
    ("window", {}),
    ("streamingllm", {"start_size": 4}),
    ("sirllm", {"start_size": 2, "recent_size": 3}),
    ("h2o", {}),
    ("tova", {}),
    ("knorm", {}),
    ("random", {"scope": "head", "seed": 5}),
]


@pytest.mark.parametrize("size", [2, 4, 7])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_group_gives_each_stream_its_bits_alone(arch, size):
    """On a CPU whose GEMM passes models/few_rows.py's proof, a group's one-token steps take each
    stream's products three at a time and its attention as alone: every stream's logits and
    keep-sets are the same bits as alone, through evictions, including knorm's exact ties (the
    tokens repeat) and streams that alone observe nothing (SDPA) beside observers (eager)."""
    from streambench.models.few_rows import exact_steps, install

    lm = LoadedModel.wrap(tiny_model(arch, layers=2))
    if not (install(lm.model) and exact_steps(lm.model)):
        pytest.skip("this CPU's GEMM does not compute a column alike in 2- and 3-column products")
    cases = LOCKSTEP[:size] if size < len(LOCKSTEP) else LOCKSTEP
    ids = stream_ids(48, vocab=24)  # (a small vocabulary: twins, knorm's ties)
    group = [make_policy(n, a) for n, a in cases]
    with StreamSession(lm, group[0], group=group) as together:
        assert together._few_rows == "exact"
        logits, kept = run(together, ids.expand(len(group), -1), 1)
        assert not together.cache.ragged
    for b, (name, args) in enumerate(cases):
        with StreamSession(lm, make_policy(name, args)) as alone:
            single, single_kept = run(alone, ids, 1)
        assert torch.equal(logits[b : b + 1], single), (name, (logits[b : b + 1] - single).abs().max())
        np.testing.assert_array_equal(kept[b], single_kept[0], err_msg=name)


def test_a_stream_beside_one_with_pads_keeps_its_bits():
    """snapkv evicts `interval` tokens at once, so its stream holds pads while the others do not:
    the pads grow the cache, yet the others renormalise their offsets where alone they do (the
    capacity the group started with) and keep their bits through many renormalisations; snapkv's
    own stream is float-close (its keys sit in other slots than alone)."""
    from streambench.models.few_rows import exact_steps, install

    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    if not (install(lm.model) and exact_steps(lm.model)):
        pytest.skip("this CPU's GEMM does not compute a column alike in 2- and 3-column products")
    cases = [("window", {}), ("snapkv", {"window": 4, "kernel": 3, "interval": 3}), ("knorm", {}), ("h2o", {})]
    ids = stream_ids(80, vocab=24)
    group = [make_policy(n, a) for n, a in cases]
    ragged = renorms = 0
    with StreamSession(lm, group[0], group=group) as together:
        out = []
        for i in range(ids.shape[1]):
            before = int(together.cache._offsets[0])  # (window's: one more per token)
            out.append(together.feed(ids[:, i : i + 1].expand(len(group), -1)))
            ragged += together.cache.ragged
            renorms += int(together.cache._offsets[0]) < before
        logits = torch.cat(out, dim=1)
        assert together.cache.capacity > BUDGET  # (grown by the pads)
    assert ragged > 20 and renorms >= 3
    for b, (name, args) in enumerate(cases):
        with StreamSession(lm, make_policy(name, args)) as alone:
            single, _ = run(alone, ids, 1)
        if name == "snapkv":
            torch.testing.assert_close(logits[b : b + 1], single, atol=2e-5, rtol=0)
        else:
            assert torch.equal(logits[b : b + 1], single), (name, (logits[b : b + 1] - single).abs().max())


def test_a_dialogue_batch_keeps_the_faster_layout():
    """A group made with bitwise=False (a dialogue batch: its turns are float-close anyway)
    takes the few-rows layout, and its attention is the batch's."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    group = [make_policy("h2o", {}), make_policy("knorm", {})]
    with StreamSession(lm, group[0], group=group, bitwise=False) as together:
        assert together._few_rows == "few" and not together.observer.exact_rows


def test_a_group_of_the_same_policy_is_a_batch():
    """Two streams under h2o in a group evict together, as two batched streams would."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = distinct(40)
    group = [make_policy("h2o", {}), make_policy("h2o", {})]
    with StreamSession(lm, group[0], group=group) as together:
        logits, kept = run(together, ids.expand(2, -1), 1)
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    np.testing.assert_array_equal(kept[0], kept[1])


def test_streams_evict_when_their_own_policy_would():
    """A stream whose policy evicts to fewer keys than another's (snapkv every 3 tokens, window
    every token) evicts at its own times: the cache then holds unequal counts per stream (pads
    at the first ranks of the shorter ones' lanes), and each stream's count is its count alone
    after every token."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    cases = [("window", {}), ("snapkv", {"window": 4, "kernel": 3, "interval": 3})]
    ids = distinct(30)
    group = [make_policy(n, a) for n, a in cases]
    alone = [StreamSession(lm, make_policy(n, a)) for n, a in cases]
    ragged = 0
    with StreamSession(lm, group[0], group=group) as together:
        for i in range(ids.shape[1]):
            together.feed(ids[:, i : i + 1].expand(2, -1))
            ragged += together.cache.ragged
            for b, session in enumerate(alone):
                session.feed(ids[:, i : i + 1])
                assert together.streams_kv()[b] == (session.kv_tokens, session.kv_bytes), (i, b)
    assert ragged > 5


def test_join_keeps_takes_every_form():
    n, layers, heads = 6, 2, 3
    same = join_keeps([np.array([0, 2, 5]), np.array([1, 2, 3])], n, layers, heads)
    assert same.shape == (2, 3)
    lanes = join_keeps([np.array([0, 2, 5]), np.tile(np.array([1, 2, 3]), (layers, heads, 1))], n, layers, heads)
    assert lanes.shape == (2, layers, heads, 3) and (lanes[0] == [0, 2, 5]).all()
    per_layer = join_keeps([np.array([[0, 1], [4, 5]]), np.array([0, 5])], n, layers, heads)
    assert per_layer.shape == (2, layers, heads, 2) and (per_layer[0, 1] == [4, 5]).all()
    unequal = join_keeps([np.array([0, 2, 5]), np.arange(n)], n, layers, heads)
    assert unequal.dtype == bool and unequal.shape == (2, layers, heads, n)
    assert unequal[0].sum(-1).tolist() == [[3] * heads] * layers and unequal[1].all()


def test_what_cannot_join_a_group_says_why():
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    assert ungroupable(make_policy("longmem", {"start_size": 2, "block_size": 2})) is not None
    assert ungroupable(make_policy("recompute-window", {})) is not None
    assert ungroupable(make_policy("h2o", {})) is None
    with pytest.raises(ConfigError, match="share one budget"):
        StreamSession(lm, make_policy("h2o", {}), group=[make_policy("h2o", {}), make_policy("tova", {}, budget=20)])
    with pytest.raises(ConfigError, match="memory bank"):
        group = [make_policy("h2o", {}), make_policy("longmem", {"start_size": 2, "block_size": 2})]
        StreamSession(lm, group[0], group=group)
    group = [make_policy("h2o", {}), make_policy("tova", {})]
    with StreamSession(lm, group[0], group=group) as together, pytest.raises(ConfigError, match="branches"):
        together.checkpoint()


def test_pads_are_masked_in_a_group_without_attention_observers():
    """A group's streams may keep unequal counts (one evicts more at a time than another); so a
    group routes attention through the observer, which masks the pads, whatever its policies
    observe. The cache made ragged by hand: each stream's next logits are a fresh forward's over
    its kept tokens (1 layer)."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=1))
    ids = distinct(20)
    group = [make_policy("window", {}), make_policy("knorm", {})]
    with StreamSession(lm, group[0], group=group) as together:
        assert together.observer is not None  # (the route that masks pads)
        together.feed(ids[:, :10].expand(2, -1))
        n = together.cache.length
        keep = np.zeros((2, 1, together.cache.kv_heads, n), dtype=bool)
        keep[0, ..., 2:] = True  # stream 0 keeps 8, stream 1 keeps 5: pads in stream 1's lanes
        keep[1, ..., [0, 3, 5, 8, 9]] = True
        together._evict(keep)
        assert together.cache.ragged
        logits = together.feed(ids[:, 10:11].expand(2, -1))[:, -1]
    kept = [list(range(2, 10)), [0, 3, 5, 8, 9]]
    for b in range(2):
        fresh = lm.model(input_ids=torch.cat([ids[:, kept[b]], ids[:, 10:11]], dim=1)).logits[:, -1]
        torch.testing.assert_close(logits[b : b + 1], fresh, atol=1e-5, rtol=0)
