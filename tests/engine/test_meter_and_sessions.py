"""The meter reads what it measures from the session it was started on; a recompute policy gets a
RecomputeSession; decode modes and rollback epochs are decided in one place."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from streambench.engine.cuda_graphs import decode_mode
from streambench.engine.meter import Meter
from streambench.engine.recompute_session import RecomputeSession
from streambench.engine.session import StreamSession, StreamState
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy


def session_for(name, budget=8, layers=1):
    return StreamSession(LoadedModel.wrap(tiny_model("llama", layers=layers)), build_policy(PolicySpec(name), budget))


def ids(n, seed=0):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def test_a_meter_started_on_a_session_steps_by_what_the_session_ran():
    session = session_for("streamingllm")
    meter = Meter(session.device)
    meter.start(session)
    seen = []
    stream = ids(20)
    for lo, hi in ((0, 5), (5, 12), (12, 20)):
        session.feed(stream[:, lo:hi])
        meter.step()
        seen.append(session.kv_tokens)
    metrics, curves = meter.finish(session.allocated_kv_bytes)
    assert metrics["tokens"] == 20
    assert curves["kv_tokens"]["value"] == seen and curves["kv_tokens"]["index"] == [5, 12, 20]
    assert metrics["kv_mib_peak"] * 2**20 == pytest.approx(max(seen) * session.kv_bytes / session.kv_tokens)


def test_a_meter_that_was_never_started_measures_from_its_creation():
    meter = Meter(torch.device("cpu"))
    meter.step(3, 3, 100)  # the explicit form a task plugin may use
    metrics, _ = meter.finish(0)
    assert metrics["tokens"] == 3 and metrics["kv_tokens_peak"] == 3
    with pytest.raises(TypeError, match="started on a session"):
        Meter(torch.device("cpu")).step()


def test_a_recompute_policy_gets_a_session_without_a_cache():
    session = session_for("recompute-window", budget=6)
    assert isinstance(session, RecomputeSession) and session.recomputes and session.cache is None
    session.feed(ids(10))
    assert session.kv_tokens == 6 and session.fed == 10
    np.testing.assert_array_equal(session.held_positions(), np.arange(4, 10))
    state = session.checkpoint()
    assert isinstance(state, StreamState) and state.window is not None
    session.feed(ids(3, seed=1))
    session.rollback(state)
    assert session.fed == 10 and torch.equal(session._window, state.window)
    assert not isinstance(session_for("window"), RecomputeSession)


def test_decode_modes_are_decided_once_from_policy_cache_and_device():
    session = session_for("streamingllm")
    cpu = torch.device("cpu")
    assert decode_mode("static", session.policy, session.cache, cpu) == "static"
    assert decode_mode("static", session.policy, None, cpu) == "eager"  # no cache: nothing to replay
    h2o = session_for("h2o")  # observes attention in Python
    assert decode_mode("static", h2o.policy, h2o.cache, cpu) == "eager"
    with pytest.raises(ConfigError, match="CUDA device"):
        decode_mode("graph", session.policy, session.cache, cpu)
    with pytest.raises(ConfigError, match="eager, static or graph"):
        decode_mode("fast", session.policy, session.cache, cpu)


def test_a_rollback_cannot_cross_an_eviction_but_evictions_count_only_removals():
    session = session_for("streamingllm", budget=8)
    session.feed(ids(7))
    state = session.checkpoint()
    epoch, evictions = session.cache.epoch, session.cache.evictions
    session.feed(ids(4, seed=2))  # past the budget: one eviction
    assert session.cache.evictions == evictions + 1 and session.cache.epoch == epoch + 1
    with pytest.raises(RuntimeError, match="across an eviction"):
        session.rollback(state)
