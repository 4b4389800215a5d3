"""Reply scoring in one tree forward (engine/branches.py): each candidate's logits equal its own
forward from the same state, the state is left as it was (the next feed gives what it gives
after one-by-one scoring), the buffers are back to their size; where a tree cannot run the
session says why and scores one by one."""

import numpy as np
import pytest
import torch
from test_exactness import make_policy
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.models.loading import LoadedModel

TREE = [
    ("dense", {}),
    ("window", {}),
    ("streamingllm", {"start_size": 4}),
    ("sirllm", {"start_size": 2}),
    ("random", {"start_size": 2, "seed": 3}),
    ("knorm", {}),
    ("h2o", {}),  # (observing attention: the tree records nothing, as a rolled-back branch keeps nothing)
    ("tova", {}),
    ("snapkv", {"window": 4, "kernel": 3, "interval": 3}),
]


def options(seed=5, sizes=(3, 1, 5, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (1, n), generator=g) for n in sizes]


def one_by_one(session, branches):
    state, out = session.checkpoint(), []
    for branch in branches:
        out.append(session.feed(branch))
        session.rollback(state)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("name,args", TREE, ids=[n for n, _ in TREE])
def test_a_tree_scores_each_reply_as_its_own_forward(arch, name, args):
    lm = LoadedModel.wrap(tiny_model(arch, layers=2))
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    branches = options()
    results = []
    for tree in (True, False):
        with StreamSession(lm, make_policy(name, args)) as session:
            session.feed(ids[:, :30])
            session.reserve(max(b.shape[1] for b in branches))
            assert session.branch_reason() is None
            capacity, held = session.cache.capacity, session.cache.positions.copy()
            scored = session.score_branches(branches) if tree else one_by_one(session, branches)
            assert session.cache.capacity == capacity and session.fed == 30
            np.testing.assert_array_equal(session.cache.positions, held)
            after = session.feed(ids[:, 30:])  # the stream goes on from the state before the replies
            results.append((scored, after, session.processed))
    (tree_scored, tree_after, tree_processed), (seq_scored, seq_after, seq_processed) = results
    for a, b in zip(tree_scored, seq_scored):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    torch.testing.assert_close(tree_after, seq_after, atol=2e-5, rtol=0)
    assert tree_processed == seq_processed


def test_the_buffers_grow_for_the_tree_and_shrink_back():
    """Budget 12 holds 11 tokens before 4 replies of 11 tokens in all: the tree needs 22 slots."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    branches = options()
    with StreamSession(lm, make_policy("streamingllm", {"start_size": 4})) as session:
        session.feed(torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(2)))
        session.reserve(5)
        allocated = session.allocated_kv_bytes
        tree = session.score_branches(branches)
        assert session.allocated_kv_bytes == allocated
        assert session.branch_peak == (session.kv_tokens + 5, (session.kv_tokens + 5) * session._token_bytes)
        seq = one_by_one(session, branches)
    for a, b in zip(tree, seq):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_a_retrieving_policy_scores_one_by_one():
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    branches = options()
    args = {"start_size": 2, "block_size": 2, "top_k": 1, "refresh": 3, "bank_tokens": 16}
    with StreamSession(lm, make_policy("longmem", args)) as session:
        session.feed(torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(2)))
        session.reserve(5)
        assert "retrieves" in session.branch_reason()
        scored = session.score_branches(branches)
        again = one_by_one(session, branches)
        assert session.branch_peak[0] == session.kv_tokens + 5
    for a, b in zip(scored, again):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("policy", ["streamingllm", "sirllm", "h2o", "tova"])
def test_grocery_chooses_and_scores_alike_with_and_without_trees(policy, monkeypatch):
    """A real (random) tiny model: every record's choice, log-probs and greedy flags are those
    of scoring each reply in its own forward."""
    from tiny_models import byte_tokenizer

    from streambench.engine.meter import Meter
    from streambench.policies.build import PolicySpec, build_policy
    from streambench.tasks.base import NoProgress
    from streambench.tasks.build import build_task

    lm = LoadedModel.wrap(tiny_model("llama", layers=2, vocab=258), byte_tokenizer())
    runs = []
    for tree in (True, False):
        if not tree:
            monkeypatch.setattr(StreamSession, "branch_reason", lambda self: "off")
        task = build_task("grocery", {"limit": 2, "seed": 1})
        session = StreamSession(lm, build_policy(PolicySpec(policy, {}), 384))
        runs.append(task.run(session, lm.tokenizer, Meter(session.device), NoProgress()))
    tree_run, plain = runs
    assert tree_run.metrics["accuracy"] == plain.metrics["accuracy"]
    assert len(tree_run.records) == len(plain.records) > 20
    for a, b in zip(tree_run.records, plain.records):
        assert a["chosen"] == b["chosen"] and a["greedy"] == b["greedy"]
        assert a["first_token_logprob"] == b["first_token_logprob"] and a["kv_tokens"] == b["kv_tokens"]
