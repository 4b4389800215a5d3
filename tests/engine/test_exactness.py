"""The heart of the project: a policy's cache after eviction, keys re-indexed to their new slots,
gives the logits an exact computation gives, for every policy and every supported architecture."""

import numpy as np
import pytest
import torch
from reference import ReferenceStream, fresh_logits
from tiny_models import ARCHITECTURES, tiny_model

from streambench.engine.observe import CAPTURED
from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.architecture import kv_heads_of
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy

# Every registered policy, with arguments that make it evict often on short streams.
POLICY_CASES = [
    ("dense", {}),
    ("window", {}),
    ("streamingllm", {"start_size": 4}),
    ("sirllm", {"start_size": 2, "recent_size": 3}),
    ("sirllm", {"score": "upstream", "decay": 0.8}),
    ("recompute-window", {}),
    ("longmem", {"start_size": 2, "block_size": 2, "top_k": 1, "refresh": 3, "bank_tokens": 16}),
    ("random", {"start_size": 2, "seed": 3}),
    ("random", {"scope": "layer", "start_size": 1, "seed": 4}),
    ("random", {"scope": "head", "seed": 5}),
    ("h2o", {}),
    ("h2o", {"heavy_size": 8}),
    ("tova", {}),
    ("knorm", {"start_size": 1, "recent_size": 2}),
    ("snapkv", {"window": 4, "kernel": 3, "interval": 3}),
]
IDS = [f"{name}-{'-'.join(map(str, args.values()))}" if args else name for name, args in POLICY_CASES]
BUDGET = 12


def make_policy(name, args, budget=BUDGET):
    return build_policy(PolicySpec(name, dict(args)), budget)


def stream_ids(n, vocab=96, seed=1):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def kept_positions(session, fed):
    if session.cache is None:  # recompute-window: the last `size` tokens
        return np.arange(max(0, fed - session.policy.budget), fed)
    return session.cache.positions


def open_session(model, name, args, budget=BUDGET):
    """The session, or None where the model must refuse the policy: attention observations need
    attention routed through transformers' AttentionInterface (Falcon computes its own), and the
    refusal is one line naming why."""
    policy = make_policy(name, args, budget)
    lm = LoadedModel.wrap(model)
    if not lm.layout.routable and policy.observes & CAPTURED:
        with pytest.raises(ConfigError, match="AttentionInterface"):
            StreamSession(lm, policy)
        return None
    return StreamSession(lm, policy)


def replays(policy) -> bool:
    """The reference cannot recompute what a retrieval bank or an attention observation chose: it
    replays the engine's kept sets (and still rebuilds every state from its own captures)."""
    return policy.retrieves or bool(policy.observes - {"logits"})


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name,args", POLICY_CASES, ids=IDS)
def test_one_layer_cache_equals_fresh_forward_over_kept_tokens(arch, name, args):
    """With one layer, kept keys/values depend only on their token and position: after any number
    of evictions the next-token logits equal a fresh forward over exactly the kept tokens at 0..n-1."""
    model = tiny_model(arch, layers=1)
    session = open_session(model, name, args)
    if session is None:
        return
    ids = stream_ids(64)
    for t in range(ids.shape[1]):
        logits = session.feed(ids[:, t : t + 1])[0, -1]
        if t % 7 == 6 or t == ids.shape[1] - 1:
            fresh = fresh_logits(model, ids[:, : t + 1], kept_positions(session, t + 1))
            torch.testing.assert_close(logits, fresh, atol=1e-4, rtol=0)
        if t % 20 == 19:
            session.new_round()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name,args", POLICY_CASES, ids=IDS)
def test_deep_cache_equals_reference_rebuilt_from_kept_states(arch, name, args):
    """With several layers, the engine (swap-remove slots, shared rotation offset, re-rotation from
    pre-RoPE keys) equals a plain DynamicCache rebuilt every step from the kept tokens' states."""
    model = tiny_model(arch, layers=3)
    policy = make_policy(name, args)
    if policy.recompute:
        pytest.skip("recompute-window keeps no states; its definition is tested below")
    session = open_session(model, name, args)
    if session is None:
        return
    reference = ReferenceStream(model, make_policy(name, args))
    ids = stream_ids(48, seed=2)
    for t in range(ids.shape[1]):
        got = session.feed(ids[:, t : t + 1])
        # retrieval brings evicted tokens back: the reference replays the engine's kept set
        replay = session.cache.positions[..., :-1] if replays(policy) else None
        want = reference.feed(ids[:, t : t + 1], keep_positions=replay)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        if session.cache is not None:
            np.testing.assert_array_equal(session.cache.positions, reference.positions)
        if t % 15 == 14:
            session.new_round()
            reference.new_round()


@pytest.mark.parametrize(
    "name,args",
    [c for c in POLICY_CASES if c[0] != "recompute-window"],
    ids=[i for i, c in zip(IDS, POLICY_CASES) if c[0] != "recompute-window"],
)
def test_chunked_feeding_equals_reference(name, args):
    """Multi-token chunks (dialogue turns, --chunk-size): eviction before each chunk, causal mask
    inside it; still equal to the rebuilt reference."""
    model = tiny_model("llama", layers=2)
    session = StreamSession(LoadedModel.wrap(model), make_policy(name, args))
    reference = ReferenceStream(model, make_policy(name, args))
    ids = stream_ids(90, seed=3)
    for start, size in zip(range(0, 90, 5), [1, 3, 5, 2, 7, 4] * 10):
        limit = session.policy.max_incoming or size  # longer chunks are split by the session: split here too
        for at in range(start, min(start + size, ids.shape[1]), limit):
            chunk = ids[:, at : min(at + limit, start + size)]
            got = session.feed(chunk)
            replay = session.cache.positions[..., : -chunk.shape[1]] if replays(session.policy) else None
            torch.testing.assert_close(got, reference.feed(chunk, keep_positions=replay), atol=1e-4, rtol=0)
        session.new_round()
        reference.new_round()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "name,args",
    [("random", {"scope": "head", "seed": 7}), ("h2o", {}), ("knorm", {}), ("snapkv", {"window": 3, "interval": 2})],
)
def test_per_head_keep_sets_equal_a_fresh_per_head_computation_to_1e6(arch, name, args):
    """Keep-sets that differ per KV head: each head attends over exactly its own kept tokens at
    positions 0..n-1 (their ranks in that head), to 1e-6 in fp32, after every step."""
    model = tiny_model(arch, layers=1)
    session = open_session(model, name, args)
    if session is None:
        return
    ids = stream_ids(40, seed=8)
    for t in range(ids.shape[1]):
        logits = session.feed(ids[:, t : t + 1])[0, -1]
        if t >= BUDGET:
            kept = session.cache.positions
            assert kept.shape[:2] == (1, kv_heads_of(model.config)) and kept.shape[2] <= BUDGET
            torch.testing.assert_close(logits, fresh_logits(model, ids[:, : t + 1], kept), atol=1e-6, rtol=0)
    assert session.cache.per_head


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_equals_one_full_forward(arch):
    model = tiny_model(arch, layers=2)
    session = StreamSession(LoadedModel.wrap(model), make_policy("dense", {}))
    ids = stream_ids(50, seed=4)
    streamed = torch.cat([session.feed(ids[:, t : t + 1]) for t in range(50)], dim=1)
    torch.testing.assert_close(streamed, model(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_recompute_window_is_a_fresh_forward_over_the_window():
    model = tiny_model("llama", layers=2)
    session = StreamSession(LoadedModel.wrap(model), make_policy("recompute-window", {}, budget=8))
    ids = stream_ids(30, seed=5)
    for t in range(30):
        got = session.feed(ids[:, t : t + 1])[0, -1]
        want = model(input_ids=ids[:, max(0, t - 7) : t + 1]).logits[0, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name,args", [("streamingllm", {}), ("sirllm", {"recent_size": 8})])
def test_embedded_model_equals_reference(embedded, name, args):
    """The real 30-layer model, budget 32, 100 tokens of Hamlet."""
    from streambench.tasks.texts import load_text

    ids = torch.tensor([embedded.tokenizer(load_text()[:2000])["input_ids"][:100]])
    session = StreamSession(embedded, make_policy(name, args, budget=32))
    with ReferenceStream(embedded.model, make_policy(name, args, budget=32)) as reference:
        for t in range(ids.shape[1]):
            got = session.feed(ids[:, t : t + 1])
            want = reference.feed(ids[:, t : t + 1])
            torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_a_budget_of_one_keeps_nothing_and_equals_a_fresh_forward_of_the_token():
    """--budget 1: each query sees only itself (the cache is evicted to zero tokens every step);
    its logits equal a fresh forward of that single token at position 0, and recompute-window's."""
    model = tiny_model("llama", layers=1)
    lm = LoadedModel.wrap(model)
    ids = stream_ids(12)
    window = StreamSession(lm, make_policy("window", {}, budget=1))
    recompute = StreamSession(lm, make_policy("recompute-window", {}, budget=1))
    for t in range(ids.shape[1]):
        token = ids[:, t : t + 1]
        fresh = model(input_ids=token).logits
        torch.testing.assert_close(window.feed(token), fresh, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(recompute.feed(token), fresh, atol=2e-5, rtol=1e-5)
    assert window.kv_tokens == 1 and window.cache.evictions == ids.shape[1] - 1
