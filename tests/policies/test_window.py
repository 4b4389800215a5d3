import numpy as np
import pytest

from streambench.errors import ConfigError
from streambench.policies import POLICIES
from streambench.policies.base import CacheView


@pytest.mark.parametrize("name", ["window", "recompute-window"])
def test_keeps_the_last_tokens(name):
    policy = POLICIES.get(name)(budget=5)
    assert policy.size == 5
    v = CacheView(8, 2, 5, np.arange(8), np.zeros(8))
    np.testing.assert_array_equal(policy.select(v), [5, 6, 7])


@pytest.mark.parametrize("name", ["window", "recompute-window"])
def test_rejects_impossible_sizes(name):
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="size must be >= 1"):
            POLICIES.get(name)(budget=bad)
    with pytest.raises(ConfigError, match="must be an integer"):
        POLICIES.get(name)(size="big")


def test_dense_has_no_budget():
    policy = POLICIES.get("dense")(budget=64)
    assert policy.budget is None and not policy.evicts and policy.max_incoming is None
