"""random: seeded, reproducible per stream, uniform over the evictable tokens, sinks protected."""

import numpy as np
import pytest

from streambench.errors import ConfigError
from streambench.policies.base import CacheView
from streambench.policies.build import PolicySpec, build_policy


def view(length, incoming=1, budget=8):
    return CacheView(length, incoming, budget, np.arange(length), np.zeros(length))


def test_keeps_the_sinks_and_a_sorted_random_rest():
    policy = build_policy(PolicySpec("random", {"start_size": 2}), 8)
    keep = policy.select(view(20))
    assert len(keep) == 7 and list(keep[:2]) == [0, 1] and (np.diff(keep) > 0).all() and keep[-1] < 20


def test_seeded_and_reseeded_per_stream():
    a = build_policy(PolicySpec("random", {"seed": 5}), 8)
    b = build_policy(PolicySpec("random", {"seed": 5}), 8)
    first = [a.select(view(20)).tolist() for _ in range(3)]
    assert first == [b.select(view(20)).tolist() for _ in range(3)]
    a.reset()
    assert [a.select(view(20)).tolist() for _ in range(3)] == first
    other = build_policy(PolicySpec("random", {"seed": 6}), 8)
    assert [other.select(view(20)).tolist() for _ in range(3)] != first


def test_uniform_over_the_evictable_tokens():
    """Chi-square over 4000 draws: each of the 18 non-sink ranks is kept equally often."""
    policy = build_policy(PolicySpec("random", {"start_size": 2}), 8)
    counts = np.zeros(20)
    for _ in range(4000):
        counts[policy.select(view(20))] += 1
    assert (counts[:2] == 4000).all()
    rest = counts[2:]
    expected = rest.sum() / len(rest)
    chi2 = ((rest - expected) ** 2 / expected).sum()
    assert chi2 < 40.8  # the 0.999 quantile of chi-square with 17 degrees of freedom


def test_bad_sizes():
    with pytest.raises(ConfigError, match="budget 4 must be above start_size 4"):
        build_policy(PolicySpec("random", {"start_size": 4}), 4)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        build_policy(PolicySpec("random", {"seed": "x"}), 8)
