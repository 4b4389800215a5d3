"""StreamCache bookkeeping: growth, byte accounting, swap-remove slots, and freeing."""
import gc
import weakref

import numpy as np
import torch
from tiny_models import tiny_model

from streambench.config import PolicySpec, build_policy
from streambench.models import LoadedModel
from streambench.session import StreamSession


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


def test_a_finished_session_frees_its_buffers_without_the_garbage_collector():
    session = session_for("streamingllm")
    feed(session, 12)
    buffers = weakref.ref(session.cache.k)
    gc.disable()
    try:
        del session
        assert buffers() is None
    finally:
        gc.enable()
