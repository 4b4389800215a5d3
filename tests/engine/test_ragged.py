"""Ragged streams (engine/ragged.py): a group's streams fed chunks of their own lengths in one
forward, some streams idle, give each stream's logits and keep-sets of that stream alone; so do
branches that commit nothing, and snapshots restore the batch exactly."""

import copy

import numpy as np
import pytest
import torch
from test_exactness import POLICY_CASES, make_policy
from tiny_models import tiny_model

from streambench.engine.ragged import ragged_refusal
from streambench.engine.session import StreamSession, _without_pads
from streambench.models.loading import LoadedModel

RAGGED = [(n, a) for n, a in POLICY_CASES if ragged_refusal(make_policy(n, a)) is None]
IDS = [f"{n}-{'-'.join(map(str, a.values()))}" if a else n for n, a in RAGGED]
STREAMS = 3


def schedule(seed: int, turns: int = 14, vocab: int = 96) -> list[list[torch.Tensor | None]]:
    """Per turn, each stream's chunk (1-6 tokens) or None (idle this turn)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(turns):
        row = []
        for _ in range(STREAMS):
            if rng.random() < 0.2:
                row.append(None)
            else:
                row.append(torch.from_numpy(rng.integers(3, vocab, size=(1, int(rng.integers(1, 7))))))
        out.append(row)
    return out


STATS = ("attention_sum", "attention_last")


def observed(session, b=0):
    """Stream b's attention statistics as its policy would see them alone (pads cut off)."""
    view = session.view(0, b)
    if session.group is not None:
        view = _without_pads(view, session.cache.length - int(session.cache.lane_counts()[0, b, 0]))
    out = {k: view.observed[k].clone() for k in STATS if k in view.observed}
    out["scores"] = torch.from_numpy(np.array(view.scores, dtype=np.float64))  # (sirllm's surprisals, decayed)
    return out


def alone(lm, policy, chunks, rounds):
    """One stream's turns as the dialogue code feeds them alone: reserve, then the turn."""
    logits, kept, stats = [], [], []
    with StreamSession(lm, policy) as session:
        for t, chunk in enumerate(chunks):
            if chunk is None:
                continue
            if t in rounds:
                session.new_round()
            session.reserve(chunk.shape[1])
            logits.append(session.feed(chunk))
            kept.append(session.held_positions().copy())
            stats.append(observed(session))
    return logits, kept, stats


def test_the_policies_that_batch_ragged():
    names = {n for n, _ in RAGGED}
    assert {"dense", "window", "streamingllm", "sirllm", "random", "h2o", "tova", "snapkv"} <= names
    assert not names & {"knorm", "longmem", "recompute-window"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", RAGGED, ids=IDS)
def test_ragged_streams_equal_each_stream_alone(arch, case):
    name, args = case
    lm = LoadedModel.wrap(tiny_model(arch, layers=2))
    turns = schedule(seed=len(name) + len(args))
    rounds = {3, 7, 11}
    group = [make_policy(name, args) for _ in range(STREAMS)]
    got: list[list] = [[] for _ in range(STREAMS)]
    kept: list[list] = [[] for _ in range(STREAMS)]
    stats: list[list] = [[] for _ in range(STREAMS)]
    with StreamSession(lm, group[0], group=group) as together:
        for t, row in enumerate(turns):
            if t in rounds:
                for b in range(STREAMS):
                    if row[b] is not None:
                        together.cache.rescale_scores(together.group[b].new_round, stream=b)
            together.reserve_streams([0 if c is None else c.shape[1] for c in row])
            out = together.feed_streams(row)
            for b in range(STREAMS):
                assert (out[b] is None) == (row[b] is None)
                if row[b] is not None:
                    got[b].append(out[b])
                    kept[b].append(together.held_positions(b).copy())
                stats[b].append(observed(together, b))
        assert together.cache.evictions <= sum(c is not None for r in turns for c in r)  # pads are not counted
    for b in range(STREAMS):
        chunks = [row[b] for row in turns]
        single, single_kept, single_stats = alone(lm, make_policy(name, args), chunks, rounds)
        assert len(single) == len(got[b])
        for t, (x, y) in enumerate(zip(got[b], single)):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=0, msg=f"{name} stream {b} turn {t}")
        for x, y in zip(kept[b], single_kept):
            np.testing.assert_array_equal(x, y)
        # what its policy reads (h2o's sums, tova's last row), after every turn it fed and
        # after those it sat out (a stream that fed nothing keeps its statistics)
        fed_turns = [t for t, row in enumerate(turns) if row[b] is not None]
        for t, mine in enumerate(stats[b]):
            done = [i for i, ft in enumerate(fed_turns) if ft <= t]
            if not done:
                continue
            expected = single_stats[done[-1]]
            assert mine.keys() == expected.keys()
            for key in mine:
                tol = 1e-4 if key == "scores" else 2e-5  # (a surprisal is a log-prob: its float noise)
                torch.testing.assert_close(mine[key], expected[key], atol=tol, rtol=0, msg=f"{name} {key} turn {t}")


@pytest.mark.parametrize("name", ["streamingllm", "sirllm", "h2o", "tova", "snapkv"])
def test_branches_commit_nothing_and_equal_each_stream_alone(name):
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    turns = schedule(seed=3, turns=8)
    replies = [[torch.tensor([[5, 6]]), torch.tensor([[7]]), torch.tensor([[8, 9, 10]])], None, [torch.tensor([[11]])]]
    group = [make_policy(name, {}) for _ in range(STREAMS)]
    with StreamSession(lm, group[0], group=group) as together:
        for row in turns:
            together.reserve_streams([0 if c is None else c.shape[1] for c in row])
            together.feed_streams(row)
        together.reserve_streams([3, 0, 1])
        held = [together.held_positions(b).copy() for b in range(STREAMS)]
        length, fed = together.cache.length, together.stream_fed.copy()
        scored = together.branches_streams(replies)
        assert together.cache.length == length and (together.stream_fed == fed).all()
        for b in range(STREAMS):
            np.testing.assert_array_equal(together.held_positions(b), held[b])
    for b in range(STREAMS):
        with StreamSession(lm, make_policy(name, {})) as session:
            for row in turns:
                if row[b] is not None:
                    session.reserve(row[b].shape[1])
                    session.feed(row[b])
            session.reserve([3, 0, 1][b])
            expected = session.score_branches(replies[b]) if replies[b] else []
        assert len(scored[b]) == len(expected)
        for x, y in zip(scored[b], expected):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["streamingllm", "h2o", "snapkv"])
def test_a_forward_carries_only_the_streams_that_feed(name):
    """A stream that feeds nothing this turn (or has no branches) is not a row of the forward:
    an idle or finished conversation costs nothing. Its tokens, positions and statistics stay as
    they were; the others' logits equal each alone (the ragged tests above, idle turns included)."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    rows = []
    hook = lm.model.register_forward_pre_hook(
        lambda _m, _a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    group = [make_policy(name, {}) for _ in range(STREAMS)]
    try:
        with StreamSession(lm, group[0], group=group) as together:
            together.feed_streams([torch.tensor([[5, 6, 7]])] * STREAMS)
            held = together.held_positions(1).copy()
            before = observed(together, 1)
            out = together.feed_streams([torch.tensor([[8, 9]]), None, torch.tensor([[4]])])
            assert out[1] is None and out[0].shape[1] == 2 and out[2].shape[1] == 1
            together.reserve_streams([2, 0, 0])
            together.branches_streams([[torch.tensor([[5, 6]]), torch.tensor([[3]])], None, None])
            np.testing.assert_array_equal(together.held_positions(1), held)
            for key, value in observed(together, 1).items():
                torch.testing.assert_close(value, before[key], atol=0, rtol=0)
    finally:
        hook.remove()
    assert rows == [3, 2, 1]


def test_a_snapshot_restores_the_batch():
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    turns = schedule(seed=5, turns=10)
    group = [make_policy("sirllm", {}) for _ in range(STREAMS)]
    with StreamSession(lm, group[0], group=group) as together:
        for row in turns[:5]:
            together.reserve_streams([0 if c is None else c.shape[1] for c in row])
            together.feed_streams(row)
        saved = together.snapshot()
        twin = copy.deepcopy(turns[5:])
        first = [together.feed_streams(row) for row in twin]
        together.restore(saved, keep=True)
        again = [together.feed_streams(row) for row in twin]
        for x_row, y_row in zip(first, again):
            for x, y in zip(x_row, y_row):
                assert (x is None) == (y is None)
                if x is not None:
                    torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["streamingllm", "sirllm", "h2o", "tova", "snapkv"])
def test_a_stream_starts_afresh_while_the_others_go_on(name):
    """Stream 1 starts a new conversation at turn 6 (its tokens leave, its policy starts over):
    from then on it gives what a fresh stream fed the same turns gives, and the others what they
    give alone."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    turns = schedule(seed=9, turns=14)
    group = [make_policy(name, {}) for _ in range(STREAMS)]
    got: list[list] = [[] for _ in range(STREAMS)]
    with StreamSession(lm, group[0], group=group) as together:
        for t, row in enumerate(turns):
            if t == 6:
                together.reset_streams([1])
                assert together.stream_fed[1] == 0 and together.held_positions(1).shape[-1] == 0
            together.reserve_streams([0 if c is None else c.shape[1] for c in row])
            out = together.feed_streams(row)
            for b in range(STREAMS):
                if row[b] is not None:
                    got[b].append((t, out[b], together.held_positions(b).copy(), observed(together, b)))
    for b in range(STREAMS):
        chunks = [row[b] if b != 1 or t >= 6 else None for t, row in enumerate(turns)]
        single, kept, seen = alone(lm, make_policy(name, {}), chunks, set())
        mine = [(x, k, o) for t, x, k, o in got[b] if b != 1 or t >= 6]
        assert len(mine) == len(single)
        for (x, k, o), y, k_alone, o_alone in zip(mine, single, kept, seen):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=0)
            np.testing.assert_array_equal(k, k_alone)
            for key in o:
                torch.testing.assert_close(o[key], o_alone[key], atol=1e-4, rtol=0)
