"""StreamCache bookkeeping: growth, byte accounting, swap-remove slots, and freeing."""

import gc
import weakref

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy


def session_for(name, budget=8, layers=2):
    model = tiny_model("llama", layers=layers)
    return StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name), budget))


def feed(session, n, seed=0):
    ids = torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))
    for t in range(n):
        session.feed(ids[:, t : t + 1])


def test_dense_grows_past_its_first_capacity():
    session = session_for("dense")
    start = session.cache.capacity
    feed(session, start + 5)
    assert session.cache.length == start + 5 and session.cache.capacity >= start + 5
    np.testing.assert_array_equal(session.cache.positions, np.arange(start + 5))


def test_budget_is_keys_seen_including_the_current_token():
    session = session_for("streamingllm", budget=8)
    feed(session, 30)
    assert session.kv_tokens == 8  # after the last feed: 7 kept + the token just fed
    np.testing.assert_array_equal(session.cache.positions, [0, 1, 2, 3, 26, 27, 28, 29])
    assert sorted(session.cache.slots) == list(range(8))  # valid tokens fill slots [0, n)


def test_kv_bytes_are_exact():
    session = session_for("window", budget=8, layers=2)
    feed(session, 20)
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, fp32
    assert session.kv_bytes == 8 * per_token
    assert session.cache.allocated_bytes() == 8 * per_token * 3 // 2  # + pre-RoPE keys


def assert_freed_without_the_garbage_collector(make_session):
    session = make_session()  # the only reference: made here, so `del` below can drop it
    buffers = weakref.ref(session.cache.k)
    gc.disable()
    try:
        del session
        assert buffers() is None
    finally:
        gc.enable()


def test_a_finished_session_frees_its_buffers_without_the_garbage_collector():
    def make():
        session = session_for("streamingllm")
        feed(session, 12)
        return session

    assert_freed_without_the_garbage_collector(make)


def test_splice_inserts_old_tokens_between_sinks_and_recent_exactly():
    """Retrieval's primitive: tokens taken from the cache earlier (pre-RoPE keys, values) come back
    at ranks 4.., between the sinks and the recent window; with one layer the next logits equal a
    fresh forward over the kept tokens in time order. Both sides of the insertion point are tried."""
    model = tiny_model("llama", layers=1)
    ids = torch.randint(3, 96, (1, 80), generator=torch.Generator().manual_seed(4))
    for recent_kept in (11, 2):  # insertion before a long tail, then before a short one
        session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec("streamingllm"), 16))
        for t in range(20):
            session.feed(ids[:, t : t + 1])
        saved = session.cache.take(np.arange(4, 8))  # positions 8..11 (sinks 0-3, then 8..19)
        for t in range(20, 40):
            session.feed(ids[:, t : t + 1])
        cache = session.cache
        keep = np.concatenate([np.arange(4), np.arange(cache.length - recent_kept, cache.length)])
        cache.splice(keep, 4, *saved)
        assert list(cache.positions[:8]) == [0, 1, 2, 3, 8, 9, 10, 11]
        logits = session.feed(ids[:, 40:41])[0, -1]
        kept = torch.as_tensor(np.sort(cache.positions))
        fresh = model(input_ids=ids[:, kept]).logits[0, -1]
        torch.testing.assert_close(logits, fresh, atol=1e-4, rtol=0)
        for t in range(41, 60):  # streaming goes on exactly after the splice
            logits = session.feed(ids[:, t : t + 1])[0, -1]
        fresh = model(input_ids=ids[:, torch.as_tensor(cache.positions)]).logits[0, -1]
        torch.testing.assert_close(logits, fresh, atol=1e-4, rtol=0)


def test_a_static_decode_session_is_freed_without_the_garbage_collector():
    """The CUDA-graph decoder must not form a cycle with its session: a graph's memory pool would
    stay allocated until the collector ran, inflating the next run's memory numbers."""

    def make():
        session = StreamSession(
            LoadedModel.wrap(tiny_model("llama", layers=1)), build_policy(PolicySpec("window"), 8), decode="static"
        )
        feed(session, 12)
        assert session._static.replays == 0  # eager static path (no capture on CPU) did the steps
        return session

    assert_freed_without_the_garbage_collector(make)


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda view: np.arange(view.length)[::-1].copy(), "sorted, unique ranks"),
        (lambda view: np.array([0, 0, 1]), "sorted, unique ranks"),
        (lambda view: np.arange(view.length - 2, view.length + 1), "outside"),
        (lambda view: np.arange(view.length), "more than the"),
        (lambda view: np.zeros((2, 2), dtype=np.int64), "this model has 1 layers and 2 KV heads"),
        (lambda view: np.zeros((1, 2, 2, 2), dtype=np.int64), "integer ranks of shape"),
        (lambda view: np.array([0.5, 1.5]), "integer ranks of shape"),
        (lambda view: np.array([[[0, 1], [1, 1]]]), "sorted, unique ranks"),
    ],
)
def test_a_policy_that_breaks_the_select_contract_is_one_error_naming_it(bad, message):
    from dataclasses import dataclass

    from tiny_models import tiny_model

    from streambench.engine.session import StreamSession
    from streambench.errors import PolicyContractError
    from streambench.models.loading import LoadedModel
    from streambench.policies.window import WindowPolicy

    @dataclass
    class Broken(WindowPolicy):
        name = "broken"

        def select(self, view):
            return bad(view)

    session = StreamSession(LoadedModel.wrap(tiny_model("llama", layers=1)), Broken(budget=6))
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PolicyContractError, match=f"policy broken: select\\(\\) .*{message}"):
        for t in range(12):
            session.feed(ids[:, t : t + 1])
