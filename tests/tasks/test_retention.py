"""Fact tokens and retention, the session fork, free recall (key_nll), the needle task and ratio budgets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import byte_tokenizer, tiny_model

from streambench.engine.meter import Meter
from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy
from streambench.runs.config import RunConfig, resolve_budget
from streambench.runs.runner import plan
from streambench.tasks.base import NoProgress
from streambench.tasks.build import build_task
from streambench.tasks.dialogue.chat_format import Conversation
from streambench.tasks.needle import _matches
from streambench.tasks.retention import CacheMap, Retention, kept_share, tokens_of


def lm_of(layers=2, seed=0):
    return LoadedModel.wrap(tiny_model("llama", layers=layers, vocab=258, seed=seed), byte_tokenizer())


def session_of(lm, policy="dense", budget=None, **args):
    return StreamSession(lm, build_policy(PolicySpec(policy, args), budget))


def run_task(lm, task, policy, budget, **args):
    session = session_of(lm, policy, budget, **args)
    return task.run(session, lm.tokenizer, Meter(session.device), NoProgress())


def test_kept_share_counts_lanes():
    assert kept_share(np.array([0, 1, 5]), [1, 2, 5]).tolist() == [1.0, 0.0, 1.0]
    held = np.array([[[0, 1, 2], [0, 2, 3]], [[0, 1, 3], [1, 2, 3]]])  # (L=2, H=2, n=3)
    assert kept_share(held, [0, 1, 2, 3, 9]).tolist() == [0.75, 0.75, 0.75, 0.75, 0.0]


def test_fact_tokens_decode_to_the_fact_on_both_tokenizers(embedded):
    for tokenizer in (byte_tokenizer(), embedded.tokenizer):
        text = "<|im_start|>user\nI want you to buy the GROCERY: [peanut butter].<|im_end|>\n"
        at = text.index("peanut butter")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        index = tokens_of(tokenizer, text, (at, at + len("peanut butter")), ids)
        assert tokenizer.decode([ids[i] for i in index]).strip() == "peanut butter"
        assert index == list(range(index[0], index[-1] + 1))


def test_retention_equals_a_count_from_the_cache_positions():
    """Grocery under streamingllm at a budget that evicts the key mid-episode: the recorded
    key_retention, and the tagged positions, agree with the cache's own positions."""
    lm = lm_of()
    task = build_task("grocery", {"limit": 2, "seed": 1, "recall_tokens": 2})
    conversation_probe = {}
    session = session_of(lm, "streamingllm", 300)
    from streambench.tasks.dialogue import grocery

    kept = grocery._key_kept

    def spy(conversation, item):
        out = kept(conversation, item)
        if out:
            positions = conversation.retention.positions[
                conversation.retention.fact_of == conversation.retention.facts.index("key")
            ]
            held = session.held_positions()
            conversation_probe.setdefault("counts", []).append((np.isin(positions, held).mean(), out["key_retention"]))
            text = lm.tokenizer.decode(conversation_probe["ids"][positions].tolist())
            conversation_probe.setdefault("texts", []).append(text)
        return out

    fed = []
    original = session.feed

    def recording(ids, exact=False):
        if session.fed == 0:
            fed.clear()
        if not session.fork_depth:
            fed.extend(ids[0].tolist())
            conversation_probe["ids"] = np.array(fed)
        return original(ids, exact)

    session.feed = recording
    grocery._key_kept = spy
    try:
        result = task.run(session, lm.tokenizer, Meter(session.device), NoProgress())
    finally:
        grocery._key_kept = kept
    items = [i for i in task.items() if i.kind == "key"]
    assert conversation_probe["texts"] == [i.meta["facts"][0][1] for i in items]
    for counted, recorded in conversation_probe["counts"]:
        assert counted == pytest.approx(recorded, abs=1e-4)
    assert result.metrics["key_retention"] == pytest.approx(
        np.mean([c for c, _ in conversation_probe["counts"]]), abs=1e-4
    )
    assert {"retention_by_turns", "retention_by_tokens", "cache_map"} <= set(result.curves)


def test_fork_forgets_what_it_fed_evictions_included():
    lm = lm_of()
    ids = torch.randint(3, 250, (1, 120))
    plain, forked = session_of(lm, "streamingllm", 40), session_of(lm, "streamingllm", 40)
    plain.feed(ids[:, :60])
    forked.feed(ids[:, :60])
    with forked.fork():
        forked.feed(torch.randint(3, 250, (1, 30)))  # evicts inside the fork
        assert forked.cache.evictions > plain.cache.evictions
    torch.testing.assert_close(forked.feed(ids[:, 60:]), plain.feed(ids[:, 60:]), rtol=0, atol=0)
    assert np.array_equal(forked.cache.positions, plain.cache.positions)


def test_key_nll_equals_a_plain_forward_on_a_dense_cache():
    lm = lm_of(layers=1)
    session = session_of(lm)
    conversation = Conversation(session, lm.tokenizer)
    fmt, tok = conversation.fmt, lm.tokenizer
    pieces = []
    for i, question in enumerate(["I want you to buy the GROCERY: [oats].", "What is 2 plus 3? Choices: (A) 5 (B) 6"]):
        chosen, _ = conversation.ask(question, ["A", "B"])
        pieces += [fmt.user_turn(question, first=i == 0), fmt.reply(["A", "B"][chosen])]
    nll, written = conversation.free_answer("Which one is the GROCERY?", "oats", max_new_tokens=3)
    context = [
        t
        for p in pieces + [fmt.user_turn("Which one is the GROCERY?", first=False)]
        for t in tok(p, add_special_tokens=False)["input_ids"]
    ]
    answer = tok(fmt.reply_prefix + "oats", add_special_tokens=False)["input_ids"]
    logits = lm.model(input_ids=torch.tensor([context + answer])).logits[0]
    expected = F.cross_entropy(logits[len(context) - 1 : -1].float(), torch.tensor(answer), reduction="none")
    torch.testing.assert_close(torch.tensor(nll), expected, rtol=1e-5, atol=1e-5)
    greedy = []
    for _ in range(3):
        token = lm.model(input_ids=torch.tensor([context + greedy])).logits[0, -1].argmax().item()
        if token in conversation._stop_ids():
            break
        greedy.append(token)
    assert written == tok.decode(greedy, skip_special_tokens=True)
    side = tok(fmt.user_turn("Which one is the GROCERY?", first=False), add_special_tokens=False)["input_ids"]
    assert session.fed == len(context) - len(side)  # the side question is forgotten


def test_rps_tags_every_revealed_move_and_scores_the_beating_move():
    lm = lm_of()
    task = build_task("rps", {"players": "rock", "limit": 12})
    result = run_task(lm, task, "dense", None)
    assert result.metrics["move_retention"] == 1.0  # dense keeps everything
    records = result.records
    counts = np.zeros(3, int)
    beat = []
    for r in range(1, 12):
        counts[["rock", "paper", "scissors"].index(records[r - 1]["user"])] += 1
        beat.append(records[r]["logprobs"][(int(counts.argmax()) + 1) % 3])
    assert result.metrics["beat_logprob"] == pytest.approx(np.mean(beat), abs=1e-3)
    evicting = run_task(lm, task, "streamingllm", 400)
    assert 0 < evicting.metrics["move_retention"] < 1


def test_retention_curves_bin_by_age():
    r = Retention()
    r.tag("a", [0, 1], turn=0)
    r.tag("b", [10], turn=1)
    r.sample(np.array([1, 10, 11]), fed=12, turn=2)
    assert r.share("a") == 0.5 and r.share("b") == 1.0
    curves = r.curves()
    assert curves["retention_by_turns"]["index"] == [1, 2]
    assert curves["retention_by_turns"]["value"] == [1.0, 0.5]


def test_cache_map_subsamples_and_keeps_the_first_stream():
    m = CacheMap()
    for t in range(1, 1000):
        m.record(np.arange(max(0, t - 10), t), t)
    m.end_stream()
    m.record(np.arange(5), 5)  # a second stream is not mapped
    curve = m.curve()
    assert len(curve["fed"]) <= 64 and curve["fed"] == sorted(curve["fed"]) and curve["fed"][-1] > 900
    assert all(c["rows"] for c in curve["columns"])


# ---- needle ------------------------------------------------------------------------------------------
def test_needle_cells_are_seeded_and_the_needle_sits_at_its_depth():
    tok = byte_tokenizer()
    task = build_task("needle", {"text": "filler:passkey", "lengths": "300,600", "depths": "0,50,100", "trials": 2})
    assert (
        task.cells()
        == build_task(
            "needle", {"text": "filler:passkey", "lengths": "300,600", "depths": "0,50,100", "trials": 2}
        ).cells()
    )
    assert task.cells() != build_task("needle", {"text": "filler:passkey", "lengths": "300,600", "seed": 1}).cells()
    from streambench.tasks.texts import load_text

    hay = tok(load_text("filler:passkey")[:5000], add_special_tokens=False)["input_ids"]
    for length, depth, _trial, value, offset in task.cells():
        ids, (a, b), answer = task.build(tok, hay, length, depth, value, offset)
        assert len(ids) == length
        assert tok.decode(ids[a:b]).strip() == f"The special magic number is {value}."
        room = (
            length
            - (b - a)
            - len(
                tok("\nWhat is the special magic number? The special magic number is", add_special_tokens=False)[
                    "input_ids"
                ]
            )
        )
        assert a == round(room * depth / 100)
        assert tok.decode(answer) == " " + value


def test_needle_exact_match_scoring():
    assert _matches(" 48213.\n", "48213") and _matches("48213", "48213")
    assert not _matches(" 4821", "48213") and not _matches(" the number 48213", "48213") and not _matches("", "1")


def test_needle_on_a_tiny_model_records_its_grid_and_map():
    lm = lm_of()
    task = build_task("needle", {"text": "filler:passkey", "lengths": "192,256", "depths": "0,100", "answer_tokens": 2})
    needle = len(lm.tokenizer("\nThe special magic number is 12345.\n")["input_ids"])
    for policy, budget in (("dense", None), ("streamingllm", 128)):
        result = run_task(lm, task, policy, budget)
        grid = result.curves["needle_grid"]
        assert grid["lengths"] == [192, 256] and grid["depths"] == [0, 100]
        assert result.metrics["cells"] == 4 and result.curves["cache_map"]["facts"]
        if policy == "dense":
            assert grid["needle_retention"] == [[1.0, 1.0], [1.0, 1.0]]
    assert (
        grid["needle_retention"][0] == [pytest.approx(4 / needle, abs=1e-4)] * 2
    )  # depth 0: the 4 sinks hold its start
    assert grid["needle_retention"][1] == [1.0, 1.0]  # depth 100: inside the recent window


@pytest.mark.slow
def test_dense_finds_the_passkey_and_streamingllm_loses_it_on_the_embedded_model(embedded):
    task = build_task("passkey", {})
    dense = run_task(embedded, task, "dense", None)
    sinks = run_task(embedded, task, "streamingllm", 128)
    assert dense.metrics["exact_match"] == 1 and dense.metrics["needle_retention"] == 1
    assert sinks.metrics["exact_match"] == 0 and sinks.metrics["needle_retention"] == 0
    assert dense.metrics["answer_nll"] < 0.5 < sinks.metrics["answer_nll"]


# ---- ratio budgets -------------------------------------------------------------------------------------
def test_ratio_budgets_resolve_against_the_task_context(tiny_model_dir):
    task = build_task("perplexity", {"tokens": 768})
    assert resolve_budget("25%", task) == (
        192,
        {"ratio": 0.25, "context_tokens": 768, "compression_ratio": 0.75, "keys": 192},
    )
    assert resolve_budget(64, task) == (64, {})
    needle = build_task("needle", {"lengths": "256,1024"})
    assert resolve_budget("12.5%", needle)[0] == 128
    with pytest.raises(ConfigError, match="does not know its context"):
        resolve_budget("25%", build_task("grocery", {}))
    for bad in ("0%", "150%", "x%", "-3", 0, True):
        with pytest.raises(ConfigError):
            resolve_budget(bad, task)
    config = RunConfig(
        model=str(tiny_model_dir),
        device="cpu",
        budget="25%",
        task="perplexity",
        task_args={"tokens": 400},
        policies=[PolicySpec("streamingllm"), PolicySpec("dense")],
    )
    planned = plan(config).runs
    assert planned[0].policy.budget == 100 and planned[0].budget_ratio["ratio"] == 0.25
    assert planned[1].policy.budget is None and planned[1].budget_ratio is None
