"""Evictions chosen and applied on the device (engine/cache/device_steps.py): the same logits and
keep-sets as the host path and the reference, and a full-cache step that never makes the host
wait (counted with a dispatch-mode counter, engine/host_sync.py)."""

import numpy as np
import pytest
import torch
from reference import ReferenceStream, fresh_logits
from tiny_models import ARCHITECTURES, tiny_model

from streambench.engine.host_sync import HostSyncCounter
from streambench.engine.session import StreamSession
from streambench.models.architecture import layout_of
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy

BUDGET = 12
DEVICE_CASES = [
    ("h2o", {}),
    ("h2o", {"heavy_size": 8}),
    ("tova", {}),
    ("tova", {"start_size": 2}),
    ("knorm", {}),
    ("knorm", {"start_size": 1, "recent_size": 2}),
    ("snapkv", {"window": 4, "kernel": 3, "interval": 1}),
    ("snapkv", {"window": 4, "kernel": 3, "interval": 3}),
    ("sirllm", {"start_size": 2, "recent_size": 3}),
    ("sirllm", {"score": "upstream", "decay": 0.8}),
    ("streamingllm", {"start_size": 2}),
    ("window", {}),
]
# Families whose attention the engine observes (not Falcon's own code); the hybrid ones have
# sliding-window layers beside the governed full ones.
_LAYOUTS = {arch: layout_of(tiny_model(arch, layers=2)) for arch in ARCHITECTURES}
ARCHS = [a for a, lay in _LAYOUTS.items() if lay.routable]
SLIDING = [a for a, lay in _LAYOUTS.items() if "sliding_attention" in lay.layer_kinds]
# rotate-half RoPE, partial rotary (phi), interleaved pairs (cohere), queries and keys normed
# (qwen3), sliding-window layers beside the full ones (gemma2; gemma3 with a RoPE table per kind)
VARIANTS = ["llama", "phi", "cohere", "qwen3", "gemma2", "gemma3_text"]
ONE_EACH = [
    ("h2o", {}),
    ("tova", {}),
    ("knorm", {"start_size": 1, "recent_size": 2}),
    ("snapkv", {"window": 3, "interval": 2}),
    ("sirllm", {"start_size": 2, "recent_size": 3, "decay": 0.8}),
    ("streamingllm", {"start_size": 2}),
]
IDS = [f"{n}-{'-'.join(map(str, a.values()))}" if a else n for n, a in DEVICE_CASES]


def policy(name, args, budget=BUDGET):
    return build_policy(PolicySpec(name, dict(args)), budget)


def session(model, name, args, device_steps, budget=BUDGET, batch_size=1):
    return StreamSession(LoadedModel.wrap(model), policy(name, args, budget), batch_size, device_steps=device_steps)


def ids_of(n, seed=1, batch=1):
    return torch.randint(3, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", VARIANTS)
@pytest.mark.parametrize("name,args", DEVICE_CASES, ids=IDS)
def test_device_steps_equal_the_host_path_and_stay_on_the_device(arch, name, args):
    """Token by token, nothing read on the host in between: the logits of every step and, at the
    end, every lane's kept positions equal the host path's; the bookkeeping never left the device."""
    model = tiny_model(arch, layers=2)
    host, dev = session(model, name, args, False), session(model, name, args, True)
    assert dev.device_steps and not host.device_steps
    ids = ids_of(60)
    for t in range(ids.shape[1]):
        torch.testing.assert_close(dev.feed(ids[:, t : t + 1]), host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
        if t == 29:  # a user turn: sirllm's decay rescales the scores (on the host)
            dev.new_round()
            host.new_round()
    assert dev.cache.on_device  # (nothing read the host arrays since the first eviction)
    np.testing.assert_array_equal(dev.cache.positions, host.cache.positions)
    assert not dev.cache.on_device  # (read on the host: copied back once)
    assert dev.cache.evictions == host.cache.evictions


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,args", ONE_EACH)
def test_device_steps_equal_the_reference(arch, name, args):
    """Against the independent reference (a DynamicCache rebuilt from the kept tokens' states,
    replaying the engine's keep-sets as for every attention observer), every step."""
    model = tiny_model(arch, layers=3)
    dev = session(model, name, args, True)
    reference = ReferenceStream(model, policy(name, args))
    ids = ids_of(40, seed=2)
    for t in range(ids.shape[1]):
        got = dev.feed(ids[:, t : t + 1])
        # (observers: the reference replays the engine's kept sets; sirllm it recomputes)
        replay = dev.cache.positions[..., :-1] if name != "sirllm" else None
        want = reference.feed(ids[:, t : t + 1], keep_positions=replay)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        if t % 15 == 14:
            dev.new_round()
            reference.new_round()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,args", ONE_EACH)
def test_one_layer_device_steps_equal_a_fresh_forward_over_the_kept_tokens(arch, name, args):
    """One layer: after device-side evictions each head attends over exactly its own kept tokens at
    positions 0..n-1 (their ranks in that head), to 1e-6 in fp32. The positions are read at the
    end only, so the checked steps ran on the device."""
    model = tiny_model(arch, layers=1)
    dev = session(model, name, args, True)
    ids = ids_of(40, seed=8)
    for t in range(ids.shape[1] - 1):
        dev.feed(ids[:, t : t + 1])
    logits = dev.feed(ids[:, -1:])[0, -1]
    assert dev.cache.on_device
    torch.testing.assert_close(logits, fresh_logits(model, ids, dev.cache.positions), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("name,args", DEVICE_CASES, ids=IDS)
def test_a_full_cache_step_makes_the_host_wait_for_nothing(arch, name, args):
    """The issue's counter: at a full cache, a step (forward, observation, selection, eviction,
    re-rotation, bookkeeping) reads no device value on the host (.item(), .cpu(), .numpy(), a
    boolean index, nonzero). The host path of the same policy does (its keep-set goes to numpy;
    a band's moves and re-rotations go up as index arrays): the counter sees it, so the zero is
    not the counter's blindness. gemma2: sliding-window layers beside the governed ones."""
    model = tiny_model(arch, layers=2)
    ids = ids_of(40, seed=4)
    counts = {}
    for device_steps in (False, True):
        s = session(model, name, args, device_steps)
        for t in range(30):
            s.feed(ids[:, t : t + 1])
        with HostSyncCounter() as syncs:
            for t in range(30, 36):
                s.feed(ids[:, t : t + 1])
        counts[device_steps] = syncs
    assert counts[True].count == 0, dict(counts[True].where)
    assert counts[True].upload_count == 0, dict(counts[True].uploads)  # (nor copies host data up)
    # (a band's host path reads nothing back but copies its index arrays up)
    assert counts[False].count + counts[False].upload_count > 0


def test_dense_makes_the_host_wait_for_nothing():
    """Dense never evicts: its step is the model's forward alone."""
    model = tiny_model("llama", layers=2)
    s = session(model, "dense", {}, None, budget=None)
    assert not s.device_steps
    ids = ids_of(40, seed=5)
    for t in range(30):
        s.feed(ids[:, t : t + 1])
    with HostSyncCounter() as syncs:
        for t in range(30, 36):
            s.feed(ids[:, t : t + 1])
    assert syncs.count == 0 and syncs.upload_count == 0, (dict(syncs.where), dict(syncs.uploads))


def test_the_counter_sees_host_data_made_into_tensors():
    """On a GPU these are blocking host-to-device copies (the stream is synchronized)."""
    with HostSyncCounter() as syncs:
        torch.from_numpy(np.arange(3))
        torch.tensor([1, 2])
        torch.as_tensor(np.zeros(2))
        torch.arange(4)
        torch.zeros(2, device="cpu")  # (a device named: not counted)
        torch.as_tensor(torch.ones(2, device="cpu"))  # (already a tensor: not counted)
    assert syncs.upload_count == 4, dict(syncs.uploads)
    assert syncs.count == 0
    assert torch.from_numpy.__name__ == "from_numpy"  # (restored)


def test_the_counter_sees_every_kind_of_host_read():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        x.sum().item()
        x[x > 2]  # noqa: B018 (a boolean index: its length is data)
        x.numpy()
        x.tolist()
        np.asarray(x)
        bool(x[0] > 1)
        torch.nonzero(x)
    kinds = {key.split(" at ")[0] for key in syncs.where}
    assert {"_local_scalar_dense", "index", "numpy", "tolist", "nonzero"} <= kinds
    assert syncs.count >= 7
    assert torch.Tensor.numpy is not None and "wrapped" not in torch.Tensor.numpy.__name__  # (restored)


@pytest.mark.parametrize("name,args", [("tova", {}), ("snapkv", {"window": 4, "kernel": 3, "interval": 3})])
def test_batched_streams_evict_apart_on_the_device(name, args):
    """Two streams of one batch under one policy: each chooses its own keep-set on the device,
    as on the host."""
    model = tiny_model("llama", layers=2)
    host, dev = session(model, name, args, False, batch_size=2), session(model, name, args, True, batch_size=2)
    ids = ids_of(40, seed=6, batch=2)
    for t in range(ids.shape[1]):
        torch.testing.assert_close(dev.feed(ids[:, t : t + 1]), host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
    for b in range(2):
        np.testing.assert_array_equal(dev.cache.positions_of(b), host.cache.positions_of(b))
    assert not np.array_equal(dev.cache.positions_of(0), dev.cache.positions_of(1))


def test_host_paths_after_device_steps_see_the_same_cache():
    """A turn (a chunk), a checkpoint and rollback, a fork, and a new round after device steps:
    each reads the bookkeeping on the host (one copy back), and the stream goes on as the host
    path's, back on the device at the next step."""
    model = tiny_model("qwen2", layers=2)
    host, dev = session(model, "h2o", {}, False), session(model, "h2o", {}, True)
    ids = ids_of(80, seed=7)

    def both(fn):
        a, b = fn(dev), fn(host)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)

    for t in range(20):
        both(lambda s, t=t: s.feed(ids[:, t : t + 1]))
    both(lambda s: s.feed(ids[:, 20:26]))  # a turn: evicts six at once on the device
    assert dev.cache.on_device
    dev.reserve(4)
    host.reserve(4)
    state_dev, state_host = dev.checkpoint(), host.checkpoint()
    both(lambda s: s.feed(ids[:, 26:30]))
    dev.rollback(state_dev)
    host.rollback(state_host)
    for t in range(30, 40):
        both(lambda s, t=t: s.feed(ids[:, t : t + 1]))
    dev.reserve(3)
    host.reserve(3)
    with dev.fork() as d, host.fork() as h:
        torch.testing.assert_close(d.feed(ids[:, 40:43]), h.feed(ids[:, 40:43]), atol=2e-5, rtol=0)
    dev.new_round()
    host.new_round()
    for t in range(43, 60):
        both(lambda s, t=t: s.feed(ids[:, t : t + 1]))
    assert dev.cache.on_device
    np.testing.assert_array_equal(dev.cache.positions, host.cache.positions)


def test_device_steps_are_refused_where_the_cache_keeps_host_state():
    """A quantized cache, a host-side policy (random's numpy generator): the host path. Dense
    never evicts; a band alone steps on the device (its drops made there by arange)."""
    from streambench.engine.cache.quant import KVQuant

    model = tiny_model("llama", layers=2)
    lm = LoadedModel.wrap(model)
    assert not StreamSession(lm, policy("h2o", {}), quant=KVQuant(bits=4, group=8), device_steps=True).device_steps
    assert not StreamSession(lm, policy("random", {"scope": "head"}), device_steps=True).device_steps
    assert not StreamSession(lm, build_policy(PolicySpec("dense"), None), device_steps=True).device_steps
    assert StreamSession(lm, policy("streamingllm", {}), device_steps=True).device_steps
    assert not StreamSession(lm, policy("h2o", {}), device_steps=None).device_steps  # (a CPU: off by default)
    assert SLIDING  # (hybrid models step on the device: their sliding layers keep counters only)
    hybrid = LoadedModel.wrap(tiny_model(SLIDING[0], layers=2))
    assert StreamSession(hybrid, policy("h2o", {}), device_steps=True).device_steps


GROUP = [
    ("h2o", {}),
    ("tova", {}),
    ("knorm", {}),
    ("snapkv", {"window": 4, "kernel": 3, "interval": 1}),
    ("sirllm", {"start_size": 2, "recent_size": 3, "decay": 0.8}),
    ("streamingllm", {"start_size": 4}),
    ("window", {}),
]


def group_session(lm, cases, device_steps):
    members = [policy(n, a) for n, a in cases]
    return StreamSession(lm, members[0], group=members, device_steps=device_steps)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_group_of_policies_steps_on_the_device_as_on_the_host(arch):
    """A sweep's group (one stream, a policy per batch row; bands among the scorers): each
    stream's logits and kept positions as the host path's, and a full-cache step of the whole
    group reads nothing on the host."""
    from test_grouped import distinct

    lm = LoadedModel.wrap(tiny_model(arch, layers=2))
    ids = distinct(60).expand(len(GROUP), -1)
    host, dev = group_session(lm, GROUP, False), group_session(lm, GROUP, True)
    assert dev.device_steps and not host.device_steps
    for t in range(50):
        torch.testing.assert_close(dev.feed(ids[:, t : t + 1]), host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
        if t == 25:
            dev.new_round()
            host.new_round()
    with HostSyncCounter() as syncs:
        steps = [dev.feed(ids[:, t : t + 1]) for t in range(50, 56)]
    assert syncs.count == 0, dict(syncs.where)
    assert syncs.upload_count == 0, dict(syncs.uploads)  # (the bands' drops made on the device too)
    for t, got in zip(range(50, 56), steps):
        torch.testing.assert_close(got, host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
    assert dev.cache.on_device
    for b in range(len(GROUP)):
        np.testing.assert_array_equal(dev.held_positions(b), host.held_positions(b), err_msg=str(GROUP[b]))


def test_a_group_whose_streams_drop_unequal_counts_takes_the_host_path():
    """snapkv evicting every 3 tokens beside window evicting every token: their drops differ,
    so those steps go the host's ragged way, and the group still equals the host path."""
    from test_grouped import distinct

    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    cases = [("window", {}), ("snapkv", {"window": 4, "kernel": 3, "interval": 3}), ("h2o", {})]
    ids = distinct(40).expand(3, -1)
    host, dev = group_session(lm, cases, False), group_session(lm, cases, True)
    for t in range(40):
        torch.testing.assert_close(dev.feed(ids[:, t : t + 1]), host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
    for b in range(3):
        np.testing.assert_array_equal(dev.held_positions(b), host.held_positions(b))


@pytest.mark.parametrize("name", ["knorm", "streamingllm"])
def test_static_decode_with_device_steps_waits_for_nothing(name):
    """knorm reads key norms recorded as keys are written, and a band reads nothing, so their
    one-token steps take the static-shape forward a CUDA graph replays (run eagerly here): with
    evictions on the device between them, a step neither reads the device nor copies host data
    up, and the stream equals the host path's."""
    model = tiny_model("llama", layers=2)
    ids = ids_of(50, seed=9)
    runs = {}
    for device_steps in (False, True):
        s = StreamSession(LoadedModel.wrap(model), policy(name, {}), decode="static", device_steps=device_steps)
        assert s.decode == "static"
        logits = [s.feed(ids[:, t : t + 1]) for t in range(45)]
        with HostSyncCounter() as syncs:
            logits += [s.feed(ids[:, t : t + 1]) for t in range(45, 50)]
        runs[device_steps] = torch.cat(logits, 1), s.cache.positions.copy(), syncs
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=2e-5, rtol=0)
    np.testing.assert_array_equal(runs[True][1], runs[False][1])
    assert runs[True][2].count == runs[True][2].upload_count == 0
    assert runs[False][2].upload_count > 0


def test_a_group_of_stream_wide_policies_keeps_a_row_per_stream_on_the_device():
    """sirllm and bands keep alike in every lane of their stream: the device bookkeeping stays
    one row per stream (as the host path's), equal to the host path, counting nothing."""
    from test_grouped import distinct

    lm = LoadedModel.wrap(tiny_model("qwen2", layers=2))
    cases = [("sirllm", {"start_size": 2, "recent_size": 3}), ("streamingllm", {"start_size": 4}), ("window", {})]
    ids = distinct(40).expand(3, -1)
    host, dev = group_session(lm, cases, False), group_session(lm, cases, True)
    for t in range(34):
        torch.testing.assert_close(dev.feed(ids[:, t : t + 1]), host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
    with HostSyncCounter() as syncs:
        steps = [dev.feed(ids[:, t : t + 1]) for t in range(34, 40)]
    assert syncs.count == syncs.upload_count == 0, (dict(syncs.where), dict(syncs.uploads))
    for t, got in zip(range(34, 40), steps):
        torch.testing.assert_close(got, host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
    assert dev.cache.on_device and not dev.cache.per_head
    for b in range(3):
        np.testing.assert_array_equal(dev.held_positions(b), host.held_positions(b))
