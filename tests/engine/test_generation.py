"""Generation through the session (streambench/engine/generation.py): the decode path of `chat`, the
mtbench task and lm-eval's generate_until."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_cli import assert_user_error, invoke
from tiny_models import tiny_model

from streambench.cli.app import cli
from streambench.engine.generation import Sampling, generate
from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy
from streambench.tasks.mtbench import load_questions, repetition

MT_BENCH = "streaming-llm/data/mt_bench.jsonl"


def session_for(model, name="dense", budget=None, **args):
    return StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, args), budget))


def prompt(n=12, seed=3):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_greedy_generation_under_dense_equals_model_generate(arch):
    model = tiny_model(arch, layers=2)
    ids = prompt()
    written = generate(session_for(model), prompt=ids, max_new_tokens=24)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert written.tokens == want[0, ids.shape[1] :].tolist() and written.stop == "limit"


def test_an_evicting_policy_never_holds_more_than_its_budget_while_generating():
    model = tiny_model("llama", layers=2)
    session = session_for(model, "streamingllm", 16, start_size=4)
    held = []
    written = generate(session, prompt=prompt(10), max_new_tokens=60, on_token=lambda t: held.append(session.kv_tokens))
    assert len(written.tokens) == 60 and max(held) <= 16 and session.kv_tokens == 16


def test_a_stop_token_and_max_new_tokens_end_the_reply():
    model = tiny_model("llama", layers=2)
    free = generate(session_for(model), prompt=prompt(), max_new_tokens=12).tokens
    stopped = generate(session_for(model), prompt=prompt(), max_new_tokens=12, stop_ids={free[5]})
    first = free.index(free[5])
    assert stopped.stop == "eos" and stopped.tokens == free[:first]
    short = generate(session_for(model), prompt=prompt(), max_new_tokens=3)
    assert short.stop == "limit" and short.tokens == free[:3]


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy():
    model = tiny_model("llama", layers=2)
    greedy = generate(session_for(model), prompt=prompt(), max_new_tokens=16).tokens
    one = generate(session_for(model), prompt=prompt(), max_new_tokens=16, sampling=Sampling(1.0, 1.0, seed=7)).tokens
    two = generate(session_for(model), prompt=prompt(), max_new_tokens=16, sampling=Sampling(1.0, 1.0, seed=7)).tokens
    nucleus = generate(
        session_for(model), prompt=prompt(), max_new_tokens=16, sampling=Sampling(1.0, 1e-6, seed=7)
    ).tokens
    assert one == two and one != greedy and nucleus == greedy
    # temperatures far below float32's range are sampled in float64 after subtracting the top
    # logit: no inf/inf, and the draw is the argmax (issue 24)
    for tiny in (1e-45, 5e-324):
        cold = generate(
            session_for(model), prompt=prompt(), max_new_tokens=16, sampling=Sampling(tiny, 1.0, seed=7)
        ).tokens
        assert cold == greedy
    with pytest.raises(ConfigError, match="temperature must be a finite number >= 0"):
        Sampling(-1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature must be a finite number"):
            Sampling(bad)
    with pytest.raises(ConfigError, match="seed must be an integer from 0 to 4294967295"):
        Sampling(0.5, 1.0, seed=10**23)
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        Sampling(0.5, 0.0)


def test_repetition_counts_repeated_four_grams():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([1, 2, 3, 4] * 3) == pytest.approx(1 - 4 / 9)
    assert repetition([1, 2]) is None


def test_the_mt_bench_loader_reads_every_record_of_the_shared_file(shared_data):
    questions = load_questions(str(shared_data / MT_BENCH))
    assert len(questions) == 79 and sum(len(q["turns"]) for q in questions) == 158
    assert {q["category"] for q in questions} == {
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    }
    assert len(load_questions(str(shared_data / MT_BENCH), limit=20)) == 20


def test_a_malformed_mt_bench_record_names_its_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text(
        json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n" + json.dumps({"question_id": 2, "turns": []}) + "\n"
    )
    result = invoke(
        "run", "-q", "--task", "mtbench", "--data", str(bad), "--policy", "window", "--out", str(tmp_path / "o")
    )
    assert_user_error(result, "q.jsonl:2: an MT-Bench record needs 'turns'")


@pytest.mark.parametrize(
    "args,message",
    [
        (["-t", "max_new_tokens=0"], "max_new_tokens must be an integer >= 1"),
        (["-t", "temperature=-1"], "temperature must be a finite number >= 0"),
        (["-t", "format=sirllm"], "format must be template or plain"),
        (["--data", "/nonexistent/mt.jsonl"], "data not found"),
    ],
)
def test_mtbench_bad_arguments_fail_before_the_model_loads(args, message, tmp_path):
    assert_user_error(invoke("run", "-q", "--task", "mtbench", *args, "--out", str(tmp_path)), message)


@pytest.mark.slow
def test_mtbench_end_to_end_on_the_embedded_model(shared_data, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "run",
        "-q",
        "--task",
        "mtbench",
        "--data",
        str(shared_data / MT_BENCH),
        "--limit",
        "2",
        "-t",
        "max_new_tokens=12",
        "-t",
        "dense_nll=true",
        "--budget",
        "96",
        "--out",
        str(out),
        "--policy",
        "dense,streamingllm,window",
    )
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    for column in ("turns", "answer tok", "EOS stop", "repetition", "dense NLL", "TTFT ms", "decode tok/s", "KV MiB"):
        assert column in header
    results = {r["label"]: r for r in (json.loads(f.read_text()) for f in out.glob("*.json"))}
    assert set(results) == {"dense", "streamingllm", "window"}
    for r in results.values():
        assert r["metrics"]["turns"] == 4 and len(r["records"]) == 4
        assert all(0 < x["tokens"] <= 12 and x["answer"] for x in r["records"])
        assert r["metrics"]["kv_tokens_peak"] <= (96 if r["label"] != "dense" else 10**6)
    # the dense shadow is the very stream the policy wrote: under dense, the answer's NLL there
    # equals its NLL as it was written; under window (a 96-token window) it differs
    for x in results["dense"]["records"]:
        assert x["dense_nll"] == pytest.approx(x["own_nll"], abs=1e-3)
    assert any(abs(x["dense_nll"] - x["own_nll"]) > 1e-2 for x in results["window"]["records"][1:])
    report = tmp_path / "report"
    assert invoke("report", str(out), "--out", str(report)).exit_code == 0
    page = (report / "report.html").read_text()
    assert "Answers, side by side" in page
    first = results["streamingllm"]["records"][0]["answer"].split()[0]
    assert first in page or first in (report / "report.md").read_text()


def chat(*args, input: str):
    return CliRunner().invoke(cli, ["chat", *args], input=input, catch_exceptions=False)


def test_chat_end_to_end_with_scripted_input(tiny_model_dir):
    folder = tiny_model_dir
    script = "Hello there\n/stats\n/bogus\n/reset\nAnd again\n/quit\n"
    result = chat(
        "--model",
        str(folder),
        "--policy",
        "streamingllm",
        "--budget",
        "120",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        input=script,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.count("model> ") == 2 and "[turn 1 | 6 tokens" in out and "stopped at --max-new-tokens" in out
    assert "cache " in out and "/120 tokens" in out and "evictions" in out
    assert "(stream: " in out and "unknown command '/bogus'" in out and "(a new stream)" in out
    assert "[turn 1 |" in out.split("(a new stream)")[1]  # the count starts again


def test_chat_turn_longer_than_the_budget_is_one_line_and_the_chat_goes_on(tiny_model_dir):
    result = chat(
        "--model",
        str(tiny_model_dir),
        "--policy",
        "window",
        "--budget",
        "80",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        input="x" * 200 + "\nok\n",
    )
    assert result.exit_code == 0, result.output
    assert "(error: window: a turn of" in result.output and "[turn 1 | 4 tokens" in result.output


def test_chat_bad_options_exit_2(tmp_path):
    assert_user_error(invoke("chat", "--temperature", "-2"), "temperature must be a finite number >= 0")
    assert_user_error(invoke("chat", "--budget", "1"), "--budget must be an integer >= 2")
