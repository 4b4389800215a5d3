import numpy as np
import pytest

from streambench.errors import ConfigError
from streambench.policies import POLICIES
from streambench.policies.base import CacheView

SirLLM = POLICIES.get("sirllm")


def view(scores, incoming=1, budget=8):
    scores = np.asarray(scores, dtype=float)
    return CacheView(len(scores), incoming, budget, np.arange(len(scores)), scores)


def test_defaults_follow_the_released_scripts():
    policy = SirLLM(budget=1024)
    assert (policy.start_size, policy.entropy_size, policy.recent_size, policy.decay) == (4, 1020, 0, 1.0)
    assert policy.score == "surprisal"


def test_keeps_start_tokens_and_highest_surprisal():
    policy = SirLLM(start_size=2, entropy_size=4, recent_size=2)  # budget 8
    scores = [0.1, 0.2, 5.0, 0.3, 4.0, 0.0, 3.0, 0.4]
    # one incoming token: top (4 - 1) = 3 scores {2, 4, 6}, starts {0, 1}, then recent fill to 7
    np.testing.assert_array_equal(policy.select(view(scores)), [0, 1, 2, 4, 5, 6, 7])


def test_incoming_tokens_take_room_from_the_entropy_share():
    policy = SirLLM(start_size=1, entropy_size=3, recent_size=0)  # budget 4
    scores = [9.0, 1.0, 8.0, 7.0, 6.0]
    # 2 incoming: top (3 - 2) = 1 score over the whole cache -> rank 0 (also the start token),
    # so the recent fill brings the kept count to budget - incoming = 2.
    np.testing.assert_array_equal(policy.select(view(scores, incoming=2, budget=4)), [0, 4])


def test_ties_go_to_older_tokens():
    policy = SirLLM(start_size=0, entropy_size=3, recent_size=0)
    np.testing.assert_array_equal(policy.select(view([1.0, 1.0, 1.0, 1.0, 1.0], budget=3)), [0, 1])


def test_decay_changes_the_selection():
    """An old surprising token outranks a newer, less surprising one until decay fades it."""
    scores = np.array([0.0, 3.0, 0.1, 0.2, 2.0])  # rank 1: old key token; rank 4: a new one
    keep = SirLLM(start_size=1, entropy_size=2, recent_size=0, decay=0.5)
    np.testing.assert_array_equal(keep.select(view(scores, budget=3)), [0, 1])
    faded = scores.copy()
    faded[:4] = keep.new_round(faded[:4])  # two rounds pass for the old tokens only
    faded[:4] = keep.new_round(faded[:4])
    np.testing.assert_array_equal(faded, [0.0, 0.75, 0.025, 0.05, 2.0])
    np.testing.assert_array_equal(keep.select(view(faded, budget=3)), [0, 4])
    no_decay = SirLLM(start_size=1, entropy_size=2, recent_size=0, decay=1.0)
    np.testing.assert_array_equal(no_decay.new_round(scores), scores)


@pytest.mark.parametrize(
    "args,message",
    [
        ({"budget": 4, "start_size": 4}, "must be above start_size"),
        ({"budget": 8, "decay": 0.0}, "decay must be in"),
        ({"budget": 8, "decay": 1.5}, "decay must be in"),
        ({"budget": 8, "score": "entropy"}, "score must be one of"),
        ({"budget": 8, "entropy_size": 2, "recent_size": 1}, "disagrees with budget"),
    ],
)
def test_rejects_bad_arguments(args, message):
    with pytest.raises(ConfigError, match=message):
        SirLLM(**args)
