"""Dialogue tasks batched (--batch-size): conversations played as the ragged streams of one batch
(engine/lanes.py) give every item the record it gets alone: grocery episodes (with the free
recall asked on the side), RPS players, DailyDialog dialogues of unequal lengths."""

import copy
import json
import threading

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer, tiny_model

from streambench.engine.lanes import Lanes, LanesOutOfStep
from streambench.engine.meter import Meter
from streambench.engine.ragged import ragged_refusal
from streambench.engine.session import StreamSession
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy
from streambench.tasks.base import NoProgress
from streambench.tasks.build import build_task

_LM: dict = {}


def lm():
    if "lm" not in _LM:
        torch.manual_seed(11)
        _LM["lm"] = LoadedModel.wrap(tiny_model("llama", layers=2, vocab=258), byte_tokenizer())
    return _LM["lm"]


def play(task_name: str, args: dict, policy: str, budget: int, batch: int, policy_args=None):
    model = lm()
    task = build_task(task_name, args)
    first = build_policy(PolicySpec(policy, dict(policy_args or {})), budget)
    group = [first] + [copy.deepcopy(first) for _ in range(batch - 1)] if batch > 1 else None
    with StreamSession(model, first, group=group) as session:
        result = task.run(session, model.tokenizer, Meter(session.device), NoProgress())
    return result


def same_records(alone, batched, logprob_keys):
    assert len(alone) == len(batched)
    for a, b in zip(alone, batched):
        assert a.keys() == b.keys()
        for key in a:
            if key in logprob_keys:
                np.testing.assert_allclose(a[key], b[key], atol=2e-4, err_msg=f"{a.get('id')} {key}")
            elif key == "key_nll":
                assert a[key] == pytest.approx(b[key], abs=2e-4)
            else:
                assert a[key] == b[key], (a.get("id", a.get("round")), key)


@pytest.mark.parametrize(
    "policy,args",
    [
        ("streamingllm", {}),
        ("sirllm", {"decay": 0.9}),
        ("dense", {}),
        ("h2o", {}),
        ("tova", {}),
        ("snapkv", {"window": 8, "interval": 4}),
    ],
)
def test_grocery_batched_gives_every_item_its_record_alone(policy, args):
    task_args = {"limit": 3, "seed": 2, "recall_tokens": 6}
    alone = play("grocery", task_args, policy, 160, 1, args)
    batched = play("grocery", task_args, policy, 160, 2, args)  # (3 episodes on 2 streams: one plays two)
    same_records(alone.records, batched.records, {"first_token_logprob"})
    for key, value in alone.metrics.items():
        assert batched.metrics[key] == pytest.approx(value, abs=2e-4), key
    assert batched.curves.keys() == alone.curves.keys()
    for key in ("retention_by_turns", "retention_by_tokens", "cache_map"):
        if key in alone.curves:
            assert batched.curves[key] == alone.curves[key], key


def test_rps_players_batched_give_every_round_its_record_alone():
    task_args = {"players": "rock,paper,switch", "limit": 12, "seed": 4}
    alone = play("rps", task_args, "sirllm", 200, 1)
    batched = play("rps", task_args, "sirllm", 200, 3)
    same_records(alone.records, batched.records, {"logprobs"})
    assert batched.metrics["win_rate"] == alone.metrics["win_rate"]
    assert batched.metrics["move_retention"] == pytest.approx(alone.metrics["move_retention"], abs=1e-9)
    assert batched.curves == alone.curves


def test_dailydialog_dialogues_of_unequal_lengths_batch(tmp_path):
    """Dialogues of 3, 1 and 2 items: a stream whose dialogue ended waits for the next start."""
    path = tmp_path / "dailydialog.jsonl"
    lines = []
    for d, turns in enumerate([3, 1, 2]):
        for t in range(turns):
            choices = [{"label": label, "text": f"reply {d}{t}{label}"} for label in "ABCD"]
            stem = f"utterance {d} {t} " + "x" * (5 * d + 3 * t)  # (turns of different lengths)
            lines.append({"id": f"{d}_{t}", "question": {"stem": stem, "choices": choices}, "answerKey": "ABCD"[t % 4]})
    path.write_text("\n".join(json.dumps(line) for line in lines))
    alone = play("dailydialog", {"data": str(path)}, "streamingllm", 260, 1)
    batched = play("dailydialog", {"data": str(path)}, "streamingllm", 260, 2)
    same_records(alone.records, batched.records, {"first_token_logprob"})
    assert [r["id"] for r in batched.records] == [line["id"] for line in lines]


def test_what_runs_alone_says_why():
    assert ragged_refusal(build_policy(PolicySpec("streamingllm"), 64)) is None
    assert ragged_refusal(build_policy(PolicySpec("h2o"), 64)) is None
    assert ragged_refusal(build_policy(PolicySpec("snapkv"), 64)) is None  # (each stream its own ring of queries)
    assert ragged_refusal(build_policy(PolicySpec("knorm"), 64))  # (batch-sensitive)
    assert "bank" in ragged_refusal(build_policy(PolicySpec("longmem"), 64))
    assert build_task("grocery", {}).lanes_refusal() is None
    assert build_task("dailydialog", {}).lanes_refusal() is None  # (idle streams cost nothing: batched too)
    assert "format sirllm" in build_task("grocery", {"format": "sirllm"}).lanes_refusal()
    assert build_task("perplexity", {}).lanes_refusal() is not None


def group_session(batch=2):
    first = build_policy(PolicySpec("streamingllm"), 64)
    return StreamSession(lm(), first, group=[first] + [copy.deepcopy(first) for _ in range(batch - 1)])


def test_a_failing_conversation_fails_the_batch_with_its_own_error():
    with group_session() as session:
        lanes = Lanes(session)

        def good(lane):
            for _ in range(3):
                lane.feed(torch.tensor([[5, 6, 7]]))
            return "done"

        def bad(lane):
            lane.feed(torch.tensor([[5]]))
            raise ValueError("this conversation broke")

        with pytest.raises(ValueError, match="this conversation broke"):
            lanes.run([good, bad])
    assert not [t for t in threading.enumerate() if t.name.startswith("lane-")]


def test_conversations_out_of_step_are_one_clear_error():
    with group_session() as session:
        lanes = Lanes(session)

        def checkpoints(lane):
            lane.feed(torch.tensor([[5]]))
            lane.rollback(lane.checkpoint())

        def forks(lane):
            with lane.fork():
                lane.feed(torch.tensor([[5]]))

        with pytest.raises(LanesOutOfStep, match="--batch-size 1"):
            lanes.run([checkpoints, forks])


def test_lanes_batch_their_calls():
    """Four conversations of three turns each: three batched feeds, not twelve."""
    with group_session(4) as session:
        lanes = Lanes(session)
        out = lanes.run(
            [lambda lane, b=b: [lane.feed(torch.tensor([[3 + b] * (b + 1)])).shape for _ in range(3)] for b in range(4)]
        )
        assert lanes.calls["feed"] == 3
        assert out[2] == [torch.Size([1, 3, 258])] * 3
        assert list(session.stream_fed) == [3, 6, 9, 12]


def test_an_interrupt_in_a_conversation_reaches_the_caller():
    with group_session() as session:
        lanes = Lanes(session)

        def waits(lane):
            lane.feed(torch.tensor([[5, 6]]))
            lane.feed(torch.tensor([[7]]))

        def interrupted(lane):
            lane.feed(torch.tensor([[5]]))
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            lanes.run([waits, interrupted])
    assert not [t for t in threading.enumerate() if t.name.startswith("lane-")]


def test_run_batches_what_it_can_and_says_why_not(tiny_model_dir, tmp_path):
    """`run --batch-size`: streamingllm's and snapkv's players play as one batch, longmem's one
    at a time, and each result says which; all with the records the unbatched run gives."""
    from click.testing import CliRunner

    from streambench.cli.app import cli

    def run(out, batch):
        args = ["run", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--task", "rps"]
        args += [
            "-t",
            "players=rock,paper",
            "--limit",
            "4",
            "--budget",
            "300",
            "--policy",
            "streamingllm,snapkv,longmem",
        ]
        result = CliRunner().invoke(cli, [*args, "--batch-size", str(batch), "-q", "-o", str(out)])
        assert result.exit_code == 0, result.output
        return {r["label"]: r for r in (json.loads(p.read_text()) for p in out.glob("*.json"))}

    alone, batched = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert batched["streamingllm"]["info"]["batched"]["streams"] == 2
    assert batched["snapkv"]["info"]["batched"]["streams"] == 2
    assert "memory bank" in batched["longmem"]["info"]["batched"]["why"]
    assert "batched" not in alone["streamingllm"]["info"]
    for label in ("streamingllm", "snapkv", "longmem"):
        same_records(alone[label]["records"], batched[label]["records"], {"logprobs"})
        # (each token counted once, whichever conversation's step finds it)
        assert batched[label]["metrics"]["tokens"] == alone[label]["metrics"]["tokens"], label
