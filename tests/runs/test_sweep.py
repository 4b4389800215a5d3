"""Sweeps and the results store: round trip, resume after a kill, failures recorded, bad input."""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.errors import ResultsError
from streambench.results.store import Store


def write_spec(path, model, text, **extra):
    spec = {
        "models": [str(model)],
        "budgets": [8, 16],
        "policies": ["dense", "window", "streamingllm"],
        "tasks": [{"task": "perplexity", "text": str(text), "tokens": 60}],
        "store": str(path.parent / "store.sqlite"),
        "out": str(path.parent / "json"),
        "device": "cpu",
    }
    spec.update(extra)
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(*args):
    return CliRunner().invoke(cli, ["sweep", "-q", *map(str, args)], catch_exceptions=False)


def test_sweep_records_every_run_skips_finished_ones_and_records_failures(tmp_path, tiny_model_dir, small_text):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        small_text,
        tasks=[
            {"task": "perplexity", "text": str(small_text), "tokens": 60},
            {"task": "perplexity", "text": str(short), "tokens": 60},
        ],
    )
    result = sweep(spec)
    assert result.exit_code == 1, result.output  # failed runs make the sweep's exit status 1 (recorded all the same)
    # dense ignores the budget, so it runs once per task: 1 + 2 x 2 = 5 runs per task
    assert result.output.strip().endswith(f"5 finished, 5 failed, 0 already in {tmp_path / 'store.sqlite'}")
    assert result.output.count("FAILED") == 5 and "fewer than the 60 requested" in result.output
    with Store(tmp_path / "store.sqlite") as store:
        rows = store.rows()
        assert len(rows) == 10 and {r["status"] for r in rows} == {"finished", "failed"}
        results = list(store.results())
        assert len(results) == 5 and all(r["metrics"]["tokens"] == 59 for r in results)
        first = {r["config_hash"]: r["finished"] for r in rows if r["status"] == "finished"}
    again = sweep(spec)
    assert again.exit_code == 1
    assert again.output.strip().endswith(f"0 finished, 5 failed, 5 already in {tmp_path / 'store.sqlite'}")
    with Store(tmp_path / "store.sqlite") as store:
        assert {r["config_hash"]: r["finished"] for r in store.rows() if r["status"] == "finished"} == first
    forced = sweep(spec, "--force")
    assert "5 finished, 5 failed, 0 already" in forced.output


def test_a_killed_sweep_resumes_without_redoing_or_losing_runs(tmp_path, tiny_model_dir, small_text):
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        small_text,
        budgets=[8, 12, 16, 20, 24, 28],
        policies=["window", "streamingllm"],
        # token by token: seconds per run (exact chunks take milliseconds, and a sweep of 12 such
        # runs once ended before the signal reached it)
        tasks=[{"task": "perplexity", "text": str(small_text), "tokens": 1200, "feed": "token"}],
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streambench", "sweep", "-q", str(spec)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store_path = tmp_path / "store.sqlite"
    # Wait for what the program reports (its second "finished" line), never for a time: on a slow
    # machine a timed poll saw the sweep end before it was interrupted.
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if sum(text.startswith("finished") for text in seen) == 2:
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode == 130, (out, err)
    assert "Interrupted:" in err and "run the same command again to resume" in err
    with Store(store_path) as store:
        kept = {r["config_hash"]: r["finished"] for r in store.rows()}
    assert 2 <= len(kept) < 12
    resumed = sweep(spec)
    assert resumed.exit_code == 0, resumed.output
    assert f"{12 - len(kept)} finished, 0 failed, {len(kept)} already" in resumed.output
    with Store(store_path) as store:
        rows = {r["config_hash"]: r["finished"] for r in store.rows()}
    assert len(rows) == 12 and all(rows[h] == t for h, t in kept.items())  # nothing redone, nothing lost


def test_a_corrupt_store_is_an_error_and_left_untouched(tmp_path, tiny_model_dir, small_text):
    spec = write_spec(tmp_path / "spec.yaml", tiny_model_dir, small_text)
    bad = tmp_path / "store.sqlite"
    bad.write_bytes(b"not a database at all")
    result = sweep(spec)
    assert result.exit_code == 2 and "is not a streambench store" in result.output
    assert bad.read_bytes() == b"not a database at all"
    with pytest.raises(ResultsError, match="not an SQLite database"):
        Store(bad)


@pytest.mark.parametrize(
    "content,message",
    [
        ({"policies": ["dense"], "colour": "blue"}, "unknown key(s) colour"),
        ({"policies": ["dense"], "budgets": [0]}, "budget must be a positive integer or a percentage"),
        ({"policies": ["nope"]}, "unknown policy 'nope'"),
        ({"policies": ["streamingllm"], "budgets": [4]}, "budget 4 must be above start_size 4"),
        ({"policies": ["dense"], "kv_bits": [16, 3]}, "kv_bits: 3 is not one of 16, 8, 4, 2"),
        ({"policies": ["dense"], "kv_bits": [4], "kv_group": "x"}, "kv_group must be an integer"),
    ],
)
def test_bad_specs_fail_before_anything_runs(tmp_path, content, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**content, "store": str(tmp_path / "s.sqlite")}))
    result = sweep(spec)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "s.sqlite").exists()


def test_import_and_export_round_trip(tmp_path, tiny_model_dir, small_text):
    runner = CliRunner()
    ran = runner.invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--policy",
            "window,streamingllm",
            "--budget",
            "8",
            "--text",
            str(small_text),
            "--tokens",
            "40",
            "--out",
            str(tmp_path / "json"),
        ],
    )
    assert ran.exit_code == 0, ran.output
    store = str(tmp_path / "s.sqlite")
    imported = runner.invoke(cli, ["import", str(tmp_path / "json"), "--store", store])
    assert imported.output.strip() == f"imported 2 result(s) into {store}"
    csv_text = runner.invoke(cli, ["export", "--store", store]).output.splitlines()
    assert (
        csv_text[0].startswith("run_id,status,label,task,policy,model,budget,finished,error,") and "ppl" in csv_text[0]
    )
    assert len(csv_text) == 3 and {line.split(",")[2] for line in csv_text[1:]} == {"window", "streamingllm"}
    exported = json.loads(runner.invoke(cli, ["export", "--store", store, "--format", "json"]).output)
    assert len(exported) == 2 and all(e["result"]["schema"] == "streambench.result/1" for e in exported)
    (tmp_path / "json" / "broken.json").write_text("{")
    broken = runner.invoke(cli, ["import", str(tmp_path / "json"), "--store", store])
    assert broken.exit_code == 2 and "corrupt results file" in broken.output


def test_a_sweep_over_kv_bits_runs_each_width_and_counts_its_bytes(tmp_path, tiny_model_dir, small_text):
    """kv_bits is an axis: one run per width and policy, each its own label and config hash;
    resumed like any run; a quantized run's KV bytes are its codes, scales and zeros."""
    spec = write_spec(
        tmp_path / "spec.yaml",
        tiny_model_dir,
        small_text,
        budgets=[16],
        policies=["streamingllm", "h2o"],
        kv_bits=[16, 4, 2],
        kv_group=8,
    )
    result = sweep(spec)
    assert result.exit_code == 0, result.output
    with Store(tmp_path / "store.sqlite") as store:
        results = {r["label"]: r for r in store.results()}
    assert set(results) == {f"{p}{t}" for p in ("streamingllm", "h2o") for t in ("", " int4", " int2")}
    assert len({r["config_hash"] for r in results.values()}) == 6
    assert "kv_quant" not in results["h2o"]["config"]
    assert results["h2o int4"]["config"]["kv_quant"] == {"bits": 4, "method": "token", "group": 8}
    # head size 16, fp32: 64 bytes a vector; int4 8 bytes of codes + 2 groups x (scale, zero) x 4 bytes
    kv = {label: r["metrics"]["kv_mib_peak"] for label, r in results.items()}
    assert kv["h2o int4"] == pytest.approx(kv["h2o"] * 24 / 64)
    assert kv["h2o int2"] == pytest.approx(kv["h2o"] * 20 / 64)
    again = sweep(spec)
    assert again.output.strip().endswith(f"0 finished, 0 failed, 6 already in {tmp_path / 'store.sqlite'}")
