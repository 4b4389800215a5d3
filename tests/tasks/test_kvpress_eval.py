"""kvpress-eval: kvpress's dataset schema, rendering and RULER scoring, in both protocols."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.errors import DataError
from streambench.tasks.kvpress_eval import load_rows, render, string_match_all, string_match_part

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ruler-niah-sample.jsonl"


def test_ruler_string_match_as_kvpress_scores_it():
    # kvpress evaluation/benchmarks/ruler/calculate_metrics.py, row by row
    assert string_match_all("The number is 48213 and 90551.", ["48213", "90551", "11111"]) == pytest.approx(200 / 3)
    assert string_match_part("the answer: PARIS", ["paris", "lyon"]) == 100.0
    assert string_match_part("berlin", ["paris", "lyon"]) == 0.0


def test_rows_are_read_and_checked(tmp_path):
    rows = load_rows(str(SAMPLE), 2)
    assert len(rows) == 2 and rows[0]["answer"] == ["48213"] and rows[0]["max_new_tokens"] == 8
    bad = tmp_path / "bad.jsonl"
    for record, message in (
        ({"context": "c", "question": "q"}, "'answer' must be a string or a list"),
        ({"context": 1, "question": "q", "answer": "a"}, "'context' must be a string"),
        ({"context": "c", "question": "q", "answer": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ):
        bad.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match=message):
            load_rows(str(bad), None)


def test_rendering_is_kvpress_preprocess(embedded):
    """The chat template holds the context; the template's turn end and the assistant's start
    go with the question (kvpress `KVPressTextGenerationPipeline.preprocess`)."""
    tok = embedded.tokenizer
    context, question = render(tok, "CONTEXT TEXT", "QUESTION?", " PREFIX")
    full = tok.apply_chat_template(
        [{"role": "user", "content": "CONTEXT TEXT"}], add_generation_prompt=True, tokenize=False
    )
    # the question closes the user turn; the assistant's start and the answer prefix follow it
    assert (
        tok.decode(context) + tok.decode(question) == full.replace("CONTEXT TEXT", "CONTEXT TEXTQUESTION?") + " PREFIX"
    )
    assert tok.decode(context).endswith("CONTEXT TEXT")


@pytest.mark.parametrize("protocol", ["compress-once", "stream"])
def test_kvpress_eval_runs_in_both_protocols(protocol, tiny_model_dir, tmp_path):
    args = ["run", "-q", "--model", str(tiny_model_dir), "--task", "kvpress-eval", "-t", f"data={SAMPLE}"]
    args += ["-t", "limit=2", "-t", f"protocol={protocol}", "--budget", "96", "--policy", "streamingllm,dense"]
    result = CliRunner().invoke(cli, args + ["--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(results) == 2
    for r in results:
        assert r["info"]["protocol"] == protocol and r["metrics"]["rows"] == 2
        assert 0 <= r["metrics"]["string_match"] <= 100
        for record in r["records"]:
            kept = record["kv_tokens_at_question"]
            if r["label"] == "dense":
                assert kept == record["context_tokens"]
            elif protocol == "compress-once":
                assert kept == 96  # compressed once to the budget
            else:
                assert kept <= 96


@pytest.mark.parametrize(
    "extra,message",
    [
        (["-t", "data=nowhere.jsonl"], "not found"),
        (["-t", "data=hf:no-such/dataset"], "cannot load hf:no-such/dataset"),
        (["-t", f"data={SAMPLE}", "-t", "protocol=stream", "-t", "compression_ratio=0.5"], "applies to protocol"),
    ],
)
def test_kvpress_eval_bad_input_is_one_line(extra, message, tiny_model_dir, tmp_path):
    args = ["run", "-q", "--model", str(tiny_model_dir), "--task", "kvpress-eval", *extra, "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
