"""H2O, TOVA, KNorm, SnapKV: what the engine observes for them, and what each keeps.

The engine's exactness with their keep-sets is in tests/engine/test_exactness.py; here: the recorded
attention equals eager attention's weights, a branch's rollback restores it, and each policy's
rule keeps what it should on planted scores.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.architecture import kv_heads_of
from streambench.models.loading import LoadedModel
from streambench.policies.base import CacheView
from streambench.policies.build import PolicySpec, build_policy
from streambench.policies.window import WindowPolicy


@dataclass
class Watching(WindowPolicy):
    """A window that asks for every observation (and, with a large budget, never evicts)."""

    name = "watching"
    observes = frozenset({"attention_sum", "attention_last", "key_norm"})


def eager_attentions(arch, ids):
    model = tiny_model(arch, layers=2)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(input_ids=ids, output_attentions=True).attentions  # per layer (B, Hq, T, T)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recorded_attention_equals_eager_attention_weights(arch):
    """SDPA returns no weights; the engine's recomputation from the layer's own query and cached
    keys (chunks included) equals eager attention's, reduced per KV head: summed over queries
    (H2O) and the last query's (TOVA), to 1e-5."""
    model = tiny_model(arch, layers=2)
    if not LoadedModel.wrap(model).layout.routable:  # Falcon: its own attention code, one line saying so
        with pytest.raises(ConfigError, match="AttentionInterface"):
            StreamSession(LoadedModel.wrap(model), Watching(budget=64))
        return
    session = StreamSession(LoadedModel.wrap(model), Watching(budget=64))
    dense = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec("dense", {}), None))
    ids = torch.randint(3, 96, (1, 14), generator=torch.Generator().manual_seed(3))
    fed = 0
    for size in (5, 1, 3, 1, 4):
        chunk = ids[:, fed : fed + size]
        torch.testing.assert_close(session.feed(chunk), dense.feed(chunk), atol=1e-5, rtol=0)
        fed += size
        heads, kv = model.config.num_attention_heads, kv_heads_of(model.config)
        kinds = LoadedModel.wrap(model).layout.layer_kinds
        governed = [a for a, kind in zip(eager_attentions(arch, ids[:, :fed]), kinds) if kind != "sliding_attention"]
        for layer, attn in enumerate(
            governed
        ):  # hybrids: the full-attention layers' (sliding ones are the model's own)
            grouped = attn[0].reshape(kv, heads // kv, fed, fed)
            want_sum = grouped.sum(dim=2).mean(dim=1)  # every query so far, then the group
            want_last = grouped[:, :, -1].mean(dim=1)
            got = session.cache
            torch.testing.assert_close(got.stat(layer, "attention_sum")[0, :, :fed], want_sum, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.stat(layer, "attention_last")[0, :, :fed], want_last, atol=1e-5, rtol=0)
    norms = session.cache.ranked_stat("key_norm")
    keys = session.cache.ranked_keys()
    torch.testing.assert_close(norms, keys.float().norm(dim=-1), atol=1e-5, rtol=1e-5)


@dataclass
class WindowWatching(WindowPolicy):
    name = "window-watching"
    observes = frozenset({"window_attention"})
    observation_window = 4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "cohere", "glm", "gpt_neox"])
def test_window_attention_equals_eager_attention_of_the_last_queries(arch):
    """SnapKV's observation: the last w queries (kept in a ring as they were rotated, un-rotated at
    eviction) attend to the cache; with nothing evicted yet, that is eager attention's last w rows.
    Chunks wrap the ring; a rollback restores it (dialogue branches)."""
    model = tiny_model(arch, layers=2)
    session = StreamSession(LoadedModel.wrap(model), WindowWatching(budget=64))
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(5))
    heads, kv = model.config.num_attention_heads, kv_heads_of(model.config)
    fed = 0
    for size in (3, 1, 5, 1, 2, 6):
        session.feed(ids[:, fed : fed + size])
        fed += size
        got = session.observer.window_attention(0)
        w = min(4, fed)
        for layer, attn in enumerate(eager_attentions(arch, ids[:, :fed])):
            want = attn[0, :, fed - w :, :].reshape(kv, heads // kv, w, fed)
            torch.testing.assert_close(got[layer], want, atol=1e-5, rtol=0)
    state = session.checkpoint()
    before = session.observer.window_attention(0).clone()
    session.feed(ids[:, fed : fed + 2])
    session.rollback(state)
    torch.testing.assert_close(session.observer.window_attention(0), before, atol=0, rtol=0)
    session.feed(ids[:, fed : fed + 2])  # the same branch again, from the restored ring
    session.rollback(state)
    torch.testing.assert_close(session.observer.window_attention(0), before, atol=0, rtol=0)


def test_rollback_restores_the_observed_statistics():
    """Dialogue tasks score alternatives on branches: a branch's queries add attention to the kept
    tokens, and rolling back must take it away again (and the last query's attention)."""
    model = tiny_model("llama", layers=2)
    session = StreamSession(LoadedModel.wrap(model), Watching(budget=24))
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    session.feed(ids[:, :20])
    session.reserve(6)
    before = {k: session.cache.ranked_stat(k).clone() for k in ("attention_sum", "attention_last")}
    state = session.checkpoint()
    session.feed(ids[:, 20:26])
    session.rollback(state)
    for name, want in before.items():
        torch.testing.assert_close(session.cache.ranked_stat(name), want, atol=0, rtol=0)
    after = session.feed(ids[:, 20:26])
    fresh = StreamSession(LoadedModel.wrap(model), Watching(budget=24))
    fresh.feed(ids[:, :20])
    fresh.reserve(6)
    torch.testing.assert_close(after, fresh.feed(ids[:, 20:26]), atol=1e-6, rtol=0)


def view(scores: dict, length: int, incoming: int = 1, budget: int = 8, layers: int = 2, heads: int = 2):
    return CacheView(length, incoming, budget, np.arange(length), np.zeros(length), scores, layers, heads)


def planted(layers=2, heads=2, n=12, at=None, value=1.0, low=0.01):
    scores = torch.full((layers, heads, n), low)
    for (layer, head), rank in (at or {}).items():
        scores[layer, head, rank] = value
    return scores


def test_h2o_keeps_each_heads_heavy_hitter_and_the_recent_window():
    hitters = {(0, 0): 1, (0, 1): 2, (1, 0): 3, (1, 1): 0}
    policy = build_policy(PolicySpec("h2o", {"heavy_size": 1}), 8)  # 1 heavy + 7 recent
    keep = policy.select(view({"attention_sum": planted(at=hitters)}, 12))
    assert keep.shape == (2, 2, 7)
    for (layer, head), rank in hitters.items():  # each head keeps its own heavy hitter, no other's
        np.testing.assert_array_equal(keep[layer, head], [rank, 6, 7, 8, 9, 10, 11])
    half = build_policy(PolicySpec("h2o", {}), 8)  # the paper's split: 4 heavy + 4 recent
    assert (half.heavy_size, half.recent_size) == (4, 4)
    keep = half.select(view({"attention_sum": planted(at=hitters)}, 12))
    for (layer, head), rank in hitters.items():
        assert rank in keep[layer, head] and {9, 10, 11} <= set(keep[layer, head])


def test_tova_keeps_the_token_the_last_query_attends_to_per_layer():
    policy = build_policy(PolicySpec("tova", {}), 6)
    scores = planted(at={(0, 0): 2, (0, 1): 2, (1, 0): 7}, value=0.9)
    scores[1, 1, 7] = 0.5
    keep = policy.select(view({"attention_last": scores}, 12, budget=6))
    assert keep.shape == (2, 5)
    assert 2 in keep[0] and 7 in keep[1]
    assert 7 not in keep[0][:1]  # ties fall to the older tokens


def test_knorm_keeps_the_lowest_norm_keys_of_each_head():
    policy = build_policy(PolicySpec("knorm", {}), 4)
    norms = torch.arange(12, dtype=torch.float32).flip(0).expand(2, 2, 12).clone()  # newest lowest
    norms[0, 1, 0] = -1.0  # head (0, 1): the first key has the lowest norm of all
    keep = policy.select(view({"key_norm": norms}, 12, budget=4))
    np.testing.assert_array_equal(keep[0, 0], [9, 10, 11])
    np.testing.assert_array_equal(keep[0, 1], [0, 10, 11])
    sinks = build_policy(PolicySpec("knorm", {"start_size": 1, "recent_size": 2}), 5)
    keep = sinks.select(view({"key_norm": torch.arange(12.0).expand(2, 2, 12).clone()}, 12, budget=5))
    np.testing.assert_array_equal(keep[1, 1], [0, 1, 2, 11])  # sink, two lowest norms, recent (one incoming)


def test_snapkv_keeps_what_its_window_attends_to_and_the_window():
    policy = build_policy(PolicySpec("snapkv", {"window": 2, "kernel": 1, "interval": 1}), 6)
    n, w = 12, 2
    attn = torch.full((2, 2, 1, w, n), 0.01)
    attn[0, 0, 0, :, 3] = attn[1, 1, 0, :, 5] = 0.9  # what the window looks at
    keep = policy.select(view({"window_attention": attn}, n, budget=6, heads=2))
    assert keep.shape == (2, 2, 5)
    assert 3 in keep[0, 0] and 5 in keep[1, 1]
    for row in keep.reshape(-1, 5):
        assert {10, 11} <= set(row)  # the window stays
    pooled = build_policy(PolicySpec("snapkv", {"window": 2, "kernel": 3, "interval": 1}), 4)
    attn = torch.full((2, 2, 1, w, n), 0.0)
    attn[..., 4] = attn[..., 6] = 0.5  # pooling favours 5, between two attended tokens
    keep = pooled.select(view({"window_attention": attn}, n, budget=4, heads=2))
    assert (keep[..., 0] == 5).all()


@pytest.mark.parametrize("name", ["h2o", "tova", "knorm", "snapkv"])
def test_batched_streams_choose_apart_and_equal_single_streams(name):
    """Content-aware policies choose per stream: two streams batched give each stream's own logits."""
    model = tiny_model("llama", layers=2)
    lm = LoadedModel.wrap(model)
    # distinct tokens: a repeated token's layer-0 key norm ties exactly with its twin's, and batched
    # arithmetic may break such a tie the other way than a single stream does
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(93, generator=g)[:30] + 3 for _ in range(2)])
    batched = StreamSession(lm, build_policy(PolicySpec(name, {}), 10), batch_size=2)
    singles = [StreamSession(lm, build_policy(PolicySpec(name, {}), 10)) for _ in range(2)]
    for t in range(30):
        got = batched.feed(ids[:, t : t + 1])
        for b, single in enumerate(singles):
            torch.testing.assert_close(got[b], single.feed(ids[b : b + 1, t : t + 1])[0], atol=1e-5, rtol=0)
    for b, single in enumerate(singles):
        np.testing.assert_array_equal(
            np.sort(batched.cache.positions_of(b), axis=-1), np.sort(single.cache.positions_of(0), axis=-1)
        )


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv"])
def test_graph_decoding_falls_back_to_eager_for_observing_policies(caplog, name):
    model = tiny_model("llama", layers=1)
    with caplog.at_level("INFO", logger="streambench"):
        session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, {}), 8), decode="static")
    assert session._static is None and session.observer is not None
    assert f"{name} observes attention in Python: decoding eagerly" in caplog.text
    static = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec("knorm", {}), 8), decode="static")
    assert static._static is not None  # key norms are recorded at commit: the static path stays
