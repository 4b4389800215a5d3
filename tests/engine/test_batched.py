"""Batched streams: B independent streams in one batch give what each gives alone (logits, kept
tokens), for every policy that batches, token by token and in chunks; several texts through the
perplexity task give the same numbers at any batch size."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_exactness import POLICY_CASES, make_policy
from tiny_models import tiny_model

from streambench.cli.app import cli
from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel

BATCHED = [(n, a) for n, a in POLICY_CASES if n != "longmem"]
IDS = [f"{n}-{'-'.join(map(str, a.values()))}" if a else n for n, a in BATCHED]


def streams(count, n, vocab=96):
    """Distinct tokens within each stream: a repeated token's layer-0 key ties exactly with its
    twin's (knorm's score), and batched arithmetic may break such a tie the other way."""
    g = torch.Generator().manual_seed(7)
    return torch.stack([torch.randperm(vocab - 3, generator=g)[:n] + 3 for _ in range(count)])


def run_stream(session, ids, chunk):
    """Feed ids (B, n) in chunks; logits (B, n, V) and, per stream, the kept positions at the end."""
    out = []
    for i in range(0, ids.shape[1], chunk):
        out.append(session.feed(ids[:, i : i + chunk]))
        if i % 20 == 19:
            session.new_round()
    kept = None if session.cache is None else [session.cache.positions_of(b).copy() for b in range(session.batch)]
    return torch.cat(out, dim=1), kept


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("name,args", BATCHED, ids=IDS)
def test_batched_streams_equal_one_by_one(name, args, chunk):
    model = tiny_model("llama", layers=2)
    lm = LoadedModel.wrap(model)
    ids = streams(3, 45)
    batched = StreamSession(lm, make_policy(name, args), batch_size=3)
    logits, kept = run_stream(batched, ids, chunk)
    for b in range(3):
        alone = StreamSession(lm, make_policy(name, args))
        single, single_kept = run_stream(alone, ids[b : b + 1], chunk)
        torch.testing.assert_close(logits[b : b + 1], single, atol=2e-5, rtol=0)
        if kept is not None:
            np.testing.assert_array_equal(kept[b], single_kept[0])
    if name == "sirllm":  # scores differ per stream, so must the kept tokens: the test can tell
        assert any(not np.array_equal(kept[0], k) for k in kept[1:])


def test_batched_kv_bytes_count_every_stream():
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    one = StreamSession(lm, make_policy("streamingllm", {}))
    four = StreamSession(lm, make_policy("streamingllm", {}), batch_size=4)
    one.feed(streams(1, 30))
    four.feed(streams(4, 30))
    assert four.kv_tokens == one.kv_tokens and four.kv_bytes == 4 * one.kv_bytes


def test_retrieval_policy_refuses_a_batch():
    lm = LoadedModel.wrap(tiny_model("llama", layers=1))
    with pytest.raises(ConfigError, match="batch size 1"):
        StreamSession(lm, make_policy("longmem", {"start_size": 2, "block_size": 2}), batch_size=2)


def test_several_texts_same_numbers_at_any_batch_size(tiny_model_dir, tmp_path):
    texts = []
    for i, word in enumerate(["river", "stone", "lantern"]):
        path = tmp_path / f"t{i}.txt"
        path.write_text(" ".join(f"{word} {j % (5 + i)} and the {word}s" for j in range(40)))
        texts.append(str(path))
    results = {}
    for batch in (1, 2, 3):
        out = tmp_path / f"out{batch}"
        result = CliRunner().invoke(
            cli,
            [
                "run",
                "-q",
                "--model",
                str(tiny_model_dir),
                "--text",
                ",".join(texts),
                "--tokens",
                "60",
                "--budget",
                "16",
                "--policy",
                "streamingllm,sirllm",
                "--batch-size",
                str(batch),
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        for f in out.glob("*.json"):
            r = json.loads(f.read_text())
            assert r["info"]["streams"] == 3 and r["metrics"]["tokens"] == 3 * 59
            results[(batch, r["label"])] = r
    for label in ("streamingllm", "sirllm"):
        base = results[(1, label)]
        for batch in (2, 3):
            other = results[(batch, label)]
            assert other["config"]["batch_size"] == batch
            assert other["metrics"]["ppl"] == pytest.approx(base["metrics"]["ppl"], rel=1e-5)
            for a, b in zip(base["info"]["per_text"], other["info"]["per_text"]):
                assert a["text"] == b["text"] and a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)
    assert "batch_size" not in results[(1, "sirllm")]["config"]  # batch 1 keeps its old config hash


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "needle", "--batch-size", "2"], "runs one stream at a time"),
        (["--policy", "longmem", "--batch-size", "2"], "run it with --batch-size 1"),
        (["--batch-size", "0"], "batch size must be an integer >= 1"),
        (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    ],
)
def test_batch_size_bad_input(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["run", "-q", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


SHARDED = [(n, a) for n, a in POLICY_CASES if n not in ("dense", "recompute-window")]


@pytest.mark.parametrize(
    "name,args", SHARDED, ids=[f"{n}-{'-'.join(map(str, a.values()))}" if a else n for n, a in SHARDED]
)
def test_cache_split_over_devices_equals_one_buffer(name, args):
    """A model spread over GPUs (--device-map) caches each layer's keys on its own device: a cache in
    two shards ("cpu" and "cpu:0" are distinct devices to it) gives the single buffer's logits."""
    model = tiny_model("llama", layers=3)
    lm = LoadedModel.wrap(model)
    batch = 1 if name == "longmem" else 2
    ids = streams(batch, 50)
    whole = StreamSession(lm, make_policy(name, args), batch_size=batch)
    split = StreamSession(lm, make_policy(name, args), batch_size=batch, layer_devices=["cpu", "cpu:0", "cpu:0"])
    assert len(split.cache.shards) == 2 and len(whole.cache.shards) == 1
    a, kept_a = run_stream(whole, ids, 1)
    b, kept_b = run_stream(split, ids, 1)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for x, y in zip(kept_a, kept_b):
        np.testing.assert_array_equal(x, y)
    assert split.allocated_kv_bytes == whole.allocated_kv_bytes


def test_device_map_auto_loads_and_streams(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--device-map",
            "auto",
            "--tokens",
            "40",
            "--budget",
            "16",
            "--policy",
            "streamingllm",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert r["config"]["device_map"] == "auto" and r["model"]["devices"]


# Policies that observe attention decode eagerly (tests/policies/test_content_aware.py); knorm stays.
STATIC = [(n, a) for n, a in POLICY_CASES if n not in ("longmem", "recompute-window", "h2o", "tova", "snapkv")]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "name,args", STATIC, ids=[f"{n}-{'-'.join(map(str, a.values()))}" if a else n for n, a in STATIC]
)
def test_static_shape_decode_equals_eager(name, args, batch):
    """The CUDA-graph path's forward (whole-capacity attention with a mask, the new token written
    at a device-held slot), run eagerly here, gives the ordinary path's logits and kept tokens;
    prefill chunks go the ordinary way, then single tokens the static way."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = streams(batch, 60)
    eager = StreamSession(lm, make_policy(name, args), batch_size=batch)
    static = StreamSession(lm, make_policy(name, args), batch_size=batch, decode="static")
    for session in (eager, static):
        session.feed(ids[:, :5])
    a, kept_a = run_stream(eager, ids[:, 5:], 1)
    b, kept_b = run_stream(static, ids[:, 5:], 1)
    assert static._static is not None and static.cache.static is False
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    for x, y in zip(kept_a, kept_b):
        np.testing.assert_array_equal(x, y)


def test_cuda_graphs_need_cuda():
    lm = LoadedModel.wrap(tiny_model("llama", layers=1))
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        StreamSession(lm, make_policy("window", {}), decode="graph")


def test_static_decode_after_a_rollback_masks_the_dropped_tokens():
    """A rollback (dialogue branches) shortens the cache: the static step's mask must close the
    slots it had opened, or the next query would attend to the rolled-back tokens."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = streams(1, 30)
    outs = []
    for decode in ("eager", "static"):
        session = StreamSession(lm, make_policy("streamingllm", {}), decode=decode)
        run_stream(session, ids[:, :8], 1)
        session.reserve(5)  # evicts 1 so that the branch fits the budget of 12
        state = session.checkpoint()
        run_stream(session, ids[:, 20:25], 1)  # a branch, then dropped
        session.rollback(state)
        outs.append(run_stream(session, ids[:, 8:14], 1)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=0)


def test_mixed_shared_and_per_stream_evictions_stay_exact():
    """After a per-stream eviction the streams' slots differ: a later position-based (shared)
    eviction must not apply stream 0's moves to the others."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=1))
    ids = streams(2, 30)
    session = StreamSession(lm, make_policy("streamingllm", {}), batch_size=2)
    session.feed(ids[:, :12])
    cache = session.cache
    cache.evict(np.stack([np.arange(0, 12, 2), np.arange(1, 12, 2)]))  # different tokens per stream
    cache.evict(np.arange(2, 6))  # the same ranks for both
    logits = session.feed(ids[:, 12:13])
    for b in range(2):
        kept = torch.as_tensor(cache.positions_of(b)[:-1])
        fresh = lm.model(input_ids=torch.cat([ids[b : b + 1, kept], ids[b : b + 1, 12:13]], dim=1)).logits[0, -1]
        torch.testing.assert_close(logits[b, -1], fresh, atol=1e-4, rtol=0)
