"""Hybrid attention (Gemma 2, Gemma 3, OLMo 3; any `layer_types` mix): sliding-window layers keep
the model's own window, the policy governs the full-attention layers.

Under dense, the engine equals the model's own forward (its sliding masks included). Under any
policy it equals the reference, whose sliding layers are the model's own DynamicSlidingWindowLayer
holding the last window - 1 stream tokens at their stream distances from the query; windows below
and above the budget. KV bytes are counted per layer kind."""

import numpy as np
import pytest
import torch
from reference import ReferenceStream
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy

HYBRIDS = ("gemma3_text", "gemma2", "olmo3")
MIX = ["sliding_attention", "full_attention", "sliding_attention"]  # a sliding layer first, as Gemma 3
BUDGET = 12


def policy(name, args=None):
    return build_policy(PolicySpec(name, dict(args or {})), BUDGET)


def ids_of(n, seed=2):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", HYBRIDS)
@pytest.mark.parametrize("window", [5, 20])
def test_dense_equals_the_models_own_forward_with_its_sliding_masks(arch, window):
    model = tiny_model(arch, layers=3, layer_types=MIX, sliding_window=window)
    session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec("dense", {}), None))
    ids = ids_of(50)
    got, fed = [], 0
    for size in [1, 3, 1, 7, 1, 1, 9, 2] * 3:
        if fed >= 50:
            break
        got.append(session.feed(ids[:, fed : fed + size]))
        fed += got[-1].shape[1]
    with torch.no_grad():
        want = model(input_ids=ids[:, :fed]).logits
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-5, rtol=0)
    assert session.sliding_tokens == min(window - 1, fed)


CASES = [
    ("streamingllm", {"start_size": 4}),
    ("h2o", {}),
    ("tova", {}),
    ("snapkv", {"window": 4, "kernel": 3, "interval": 3}),
    ("knorm", {"start_size": 1, "recent_size": 2}),
    ("random", {"scope": "head", "seed": 5}),
    ("sirllm", {"start_size": 2, "recent_size": 3}),
    ("longmem", {"start_size": 2, "block_size": 2, "top_k": 1, "refresh": 3, "bank_tokens": 16}),
]


@pytest.mark.parametrize("arch", HYBRIDS)
@pytest.mark.parametrize("window", [5, 20], ids=["window-below-budget", "window-above-budget"])
@pytest.mark.parametrize("name,args", CASES, ids=[c[0] for c in CASES])
def test_every_policy_on_a_hybrid_model_equals_the_reference(arch, window, name, args):
    """One token and multi-token chunks; a sliding key's rotation follows every eviction (H2O's and
    random's keep-sets shift the recent tokens' ranks unevenly; longmem splices memory in)."""
    model = tiny_model(arch, layers=3, layer_types=MIX, sliding_window=window)
    session = StreamSession(LoadedModel.wrap(model), policy(name, args))
    reference = ReferenceStream(model, policy(name, args))
    retrieves = session.policy.retrieves or bool(session.policy.observes - {"logits"})
    ids = ids_of(70, seed=4)
    fed = 0
    for size in [1] * 30 + [3, 1, 4, 1, 2] * 8:
        if fed >= ids.shape[1]:
            break
        chunk = ids[:, fed : fed + min(size, session.policy.max_incoming or size)]
        got = session.feed(chunk)
        replay = session.cache.positions[..., : -chunk.shape[1]] if retrieves else None
        torch.testing.assert_close(got, reference.feed(chunk, keep_positions=replay), atol=1e-4, rtol=0)
        fed += chunk.shape[1]
        if fed % 13 == 0:
            session.new_round()
            reference.new_round()
    assert session.cache.sliding.visible == window - 1


def test_kv_bytes_count_the_governed_layers_and_the_sliding_windows_apart():
    model = tiny_model("gemma3_text", layers=3, layer_types=MIX, sliding_window=5)
    session = StreamSession(LoadedModel.wrap(model), policy("streamingllm", {"start_size": 4}))
    ids = ids_of(30)
    for t in range(30):
        session.feed(ids[:, t : t + 1])
    per_layer_token = 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # K and V, fp32
    assert session.kv_tokens == BUDGET and session.sliding_tokens == 4
    assert (
        session.kv_bytes == BUDGET * 1 * per_layer_token + 4 * 2 * per_layer_token
    )  # 1 full layer; 2 sliding of 4 tokens


def test_branches_roll_back_and_forks_leave_the_sliding_layers_untouched():
    """Dialogue branches: reserve() makes room, a rolled-back branch leaves no trace, a fork may
    run far past the window; the stream then equals one that never branched."""
    model = tiny_model("gemma3_text", layers=3, layer_types=MIX, sliding_window=5)
    lm = LoadedModel.wrap(model)
    branching = StreamSession(lm, policy("sirllm", {"start_size": 2, "recent_size": 3}))
    plain = StreamSession(lm, policy("sirllm", {"start_size": 2, "recent_size": 3}))
    ids = ids_of(80, seed=6)
    torch.testing.assert_close(branching.feed(ids[:, :8]), plain.feed(ids[:, :8]), atol=0, rtol=0)
    at = 8
    for _turn in range(6):
        turn_ids, side = ids[:, at : at + 5], ids[:, (at + 17) % 60 : (at + 17) % 60 + 5]
        for session in (branching, plain):
            session.reserve(5)
        state = branching.checkpoint()
        branching.feed(side)
        branching.rollback(state)
        torch.testing.assert_close(branching.feed(turn_ids), plain.feed(turn_ids), atol=1e-6, rtol=0)
        with branching.fork():
            branching.feed(ids[:, 60:75])
        probe = ids[:, at + 5 : at + 6]
        torch.testing.assert_close(branching.feed(probe), plain.feed(probe), atol=1e-6, rtol=0)
        at += 6


def test_batched_streams_on_a_hybrid_model_equal_single_streams():
    model = tiny_model("gemma2", layers=3, layer_types=MIX, sliding_window=5)
    lm = LoadedModel.wrap(model)
    rows = torch.cat([ids_of(40, seed=1), ids_of(40, seed=9)])
    batched = StreamSession(lm, policy("tova"), batch_size=2)
    singles = [StreamSession(lm, policy("tova")) for _ in range(2)]
    for t in range(40):
        got = batched.feed(rows[:, t : t + 1])
        for b, single in enumerate(singles):
            torch.testing.assert_close(got[b : b + 1], single.feed(rows[b : b + 1, t : t + 1]), atol=1e-5, rtol=0)
    assert not np.array_equal(batched.cache.positions_of(0), batched.cache.positions_of(1))


def test_a_model_whose_every_layer_slides_is_refused_with_one_line():
    model = tiny_model("mistral", layers=2, sliding_window=6)
    with pytest.raises(ConfigError, match="every layer of model type 'mistral' attends over a sliding window of 6"):
        StreamSession(LoadedModel.wrap(model), policy("streamingllm"))
