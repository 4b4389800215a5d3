import numpy as np
import pytest

from streambench.errors import ConfigError
from streambench.policies import POLICIES
from streambench.policies.base import CacheView


def view(length, incoming=1, budget=10, scores=None):
    scores = np.zeros(length) if scores is None else np.asarray(scores, dtype=float)
    return CacheView(length, incoming, budget, np.arange(100, 100 + length), scores)


def test_keeps_sinks_and_most_recent():
    policy = POLICIES.get("streamingllm")(budget=10, start_size=4)
    assert policy.recent_size == 6
    np.testing.assert_array_equal(policy.select(view(10)), [0, 1, 2, 3, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(policy.select(view(10, incoming=3)), [0, 1, 2, 3, 7, 8, 9])


def test_budget_must_exceed_start_size():
    with pytest.raises(ConfigError, match="budget 4 must be above start_size 4"):
        POLICIES.get("streamingllm")(budget=4, start_size=4)
    with pytest.raises(ConfigError, match="start_size must be >= 0"):
        POLICIES.get("streamingllm")(budget=10, start_size=-1)


def test_sizes_and_budget_must_agree():
    assert POLICIES.get("streamingllm")(start_size=4, recent_size=252).budget == 256
    with pytest.raises(ConfigError, match="disagrees with budget"):
        POLICIES.get("streamingllm")(budget=100, start_size=4, recent_size=252)
