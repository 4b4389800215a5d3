"""Every registered policy, built-in or plugin, meets the same contract without being added to a
list (as kvpress runs every press in `default_presses`): it builds from a budget alone, its
declarations name what the engine provides, its cache after any eviction gives the logits of a
fresh forward over the kept tokens (1 layer) and of the independent reference (2 layers), and a
rollback returns the stream to where it was.

Plugins: entry-point policies installed in the environment are included, and so is every kvpress
press the bridge runs in the stream when kvpress is installed (`./install.sh test` installs it);
file or module policies are added with `STREAMBENCH_CONFORMANCE=path/to/file.py:Class,pkg.mod:Other pytest
tests/policies/test_conformance.py` (the same references `--policy` takes)."""

import os

import numpy as np
import pytest
import torch
from reference import ReferenceStream, fresh_logits
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.models.loading import LoadedModel
from streambench.policies import POLICIES
from streambench.policies.base import OBSERVATIONS
from streambench.policies.build import PolicySpec, build_policy

BUDGET = 12


def registered() -> list[str]:
    POLICIES.load_plugins()  # entry points of installed distributions
    extra = [ref.strip() for ref in os.environ.get("STREAMBENCH_CONFORMANCE", "").split(",") if ref.strip()]
    for ref in extra:
        POLICIES.get(ref)  # a file or module reference, registered under its reference
    return sorted(set(POLICIES.names()) | set(extra) | set(PRESSES))  # (at collection, before any test's own plugin)


def streaming_presses() -> list[str]:
    from streambench.errors import ConfigError
    from streambench.policies import kvpress_bridge as bridge

    try:
        presses = bridge.press_classes()
    except ConfigError:  # kvpress not installed
        return []
    return [f"kvpress:{n}" for n, c in presses.items() if bridge.press_status(c)[0] == "streaming"]


PRESSES = streaming_presses()
NAMES = registered()
# presses whose defaults assume a prefill of thousands of tokens, sized for a budget of 12
PRESS_ARGS = {
    "kvpress:SnapKVPress": {"window_size": 4, "kernel_size": 3},
    "kvpress:ExpectedAttentionPress": {"n_sink": 2, "n_future_positions": 16},
    "kvpress:StreamingLLMPress": {"n_sink": 2},
    "kvpress:LagKVPress": {"n_sink": 2, "lag_size": 3},
    "kvpress:CURPress": {"num_sinks": 2, "local_window_size": 4},
    "kvpress:CapPress": {"n_sink": 2, "n_future_positions": 16},
    "kvpress:RandomPress": {"seed": 0},
    "kvpress:CriticalKVPress": {"press": "SnapKVPress(window_size=4, kernel_size=3)"},
    "kvpress:ChunkPress": {"press": "KeyDiffPress", "chunk_length": 4},
    "kvpress:BlockPress": {"press": "KeyDiffPress", "block_size": 4},
    "kvpress:KeyRerotationPress": {"press": "SnapKVPress(window_size=4, kernel_size=3)"},
    "kvpress:AdaKVPress": {"press": "SnapKVPress(window_size=4, kernel_size=3)"},
    "kvpress:PyramidKVPress": {"window_size": 4, "kernel_size": 3},
    "kvpress:CriticalAdaKVPress": {"press": "SnapKVPress(window_size=4, kernel_size=3)"},
    "kvpress:PerLayerCompressionPress": {"press": "SnapKVPress(window_size=4, kernel_size=3)"},
}
PER_LAYER = {"kvpress:PerLayerCompressionPress": "compression_ratios"}  # one ratio per model layer


def build(name, budget=BUDGET, layers=2):
    args = dict(PRESS_ARGS.get(name, {}))
    if name in PER_LAYER:
        args[PER_LAYER[name]] = [0.2 + 0.5 * i / max(layers - 1, 1) for i in range(layers)]
    return build_policy(PolicySpec(name, args), budget)


def stream_ids(n, seed):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def kept(session, fed):
    if session.cache is None:  # recompute-window: the last `size` tokens
        return np.arange(max(0, fed - session.policy.budget), fed)
    return session.cache.positions


def test_every_built_in_is_in_the_matrix():
    built_in = {"dense", "window", "recompute-window", "streamingllm", "sirllm", "longmem"}
    built_in |= {"random", "h2o", "tova", "knorm", "snapkv"}
    assert built_in <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declarations_name_what_the_engine_provides(name):
    cls = POLICIES.get(name)
    policy = build(name)
    assert set(cls.observes) <= OBSERVATIONS
    assert set(cls.sizes) <= set(policy.args())
    assert policy.budget in (None, BUDGET)  # the budget asked for is the budget run
    if policy.budget is not None and policy.max_incoming is not None:
        assert 1 <= policy.max_incoming <= BUDGET - policy.protected_start  # a full chunk leaves the sinks room


@pytest.mark.parametrize("name", NAMES)
def test_one_layer_cache_equals_a_fresh_forward_over_the_kept_tokens(name):
    model = tiny_model("llama", layers=1)
    session = StreamSession(LoadedModel.wrap(model), build(name, layers=1))
    ids = stream_ids(40, seed=5)
    for t in range(ids.shape[1]):
        logits = session.feed(ids[:, t : t + 1])[0, -1]
        if t % 5 == 4:
            torch.testing.assert_close(
                logits, fresh_logits(model, ids[:, : t + 1], kept(session, t + 1)), atol=1e-4, rtol=0
            )
        if t % 13 == 12:
            session.new_round()


@pytest.mark.parametrize("name", NAMES)
def test_chunks_equal_the_independent_reference(name):
    policy = build(name)
    if policy.recompute:
        pytest.skip("recompute-window keeps no states (the fresh-forward test covers it)")
    model = tiny_model("llama", layers=2)
    session = StreamSession(LoadedModel.wrap(model), policy)
    reference = ReferenceStream(model, build(name))
    chunks_equal(session, reference, stream_ids(60, seed=6))


def chunks_equal(session, reference, ids):
    """Feed `ids` in chunks of 1-7 tokens (split at the policy's limit); after each, the logits
    equal the reference's (which replays the kept sets it cannot recompute: retrieval, attention)."""
    policy = session.policy
    replays = policy.retrieves or bool(policy.observes - {"logits"})
    at = 0
    for size in [1, 3, 5, 2, 7, 4] * 4:
        limit = min(size, policy.max_incoming or size)
        chunk = ids[:, at : at + limit]
        if chunk.shape[1] == 0:
            break
        got = session.feed(chunk)
        replay = session.cache.positions[..., : -chunk.shape[1]] if replays else None
        torch.testing.assert_close(got, reference.feed(chunk, keep_positions=replay), atol=1e-4, rtol=0)
        at += chunk.shape[1]


@pytest.mark.parametrize("name", NAMES)
def test_a_rollback_returns_the_stream_to_where_it_was(name):
    """A branch fed after `reserve` and rolled back leaves no trace: the next logits equal those of
    the stream that never took it (the policy's own state included: `state`/`restore`)."""
    model = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = stream_ids(40, seed=7)
    straight = StreamSession(model, build(name))
    branched = StreamSession(model, build(name))
    for session in (straight, branched):
        session.feed(ids[:, :30])
        session.reserve(4)
    saved = branched.checkpoint()
    branched.feed(ids[:, 30:34].flip(-1))
    branched.rollback(saved)
    torch.testing.assert_close(branched.feed(ids[:, 30:34]), straight.feed(ids[:, 30:34]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("method,group,residual", [("token", 8, 0), ("kivi", 4, 3)], ids=["token", "kivi"])
@pytest.mark.parametrize("name", NAMES)
def test_quantized_chunks_equal_the_reference_holding_quantized_tokens(name, method, group, residual, bits):
    """Every policy over a quantized cache (engine/cache/quant.py): chunks of 1-7 tokens equal the
    independent reference holding every token quantized (per token, or KIVI's key blocks with a
    residual window); keys a policy scores are the ones attention reads (dequantized).
    recompute-window holds no cache and refuses; longmem's bank cannot rejoin KIVI's key blocks."""
    from streambench.engine.cache.quant import KVQuant
    from streambench.errors import ConfigError

    policy = build(name)
    model = tiny_model("llama", layers=2)
    quant = KVQuant(bits, method=method, group=group, residual=residual)
    if policy.recompute or (policy.retrieves and quant.per_channel):
        with pytest.raises(ConfigError, match="no cache to quantize|KIVI's key blocks"):
            StreamSession(LoadedModel.wrap(model), policy, quant=quant)
        return
    session = StreamSession(LoadedModel.wrap(model), policy, quant=quant)
    reference = ReferenceStream(model, build(name), quant=(bits, group, method, residual))
    chunks_equal(session, reference, stream_ids(40, seed=6 + bits))
