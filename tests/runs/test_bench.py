"""`streambench bench` runs and reports ratios (no timing assertions: speed is not unit-tested)."""

import json

from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.models.few_rows import exact_products_here


def test_bench_reports_every_ratio(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--policy",
            "dense,streamingllm,longmem,h2o",
            "--budget",
            "16",
            "--budgets",
            "16,32",
            "--exact-budgets",
            "16,32",
            "--exact-tokens",
            "128",
            "--group-tokens",
            "48",
            "--replies",
            "3",
            "--dialogue",
            "2",
            "--steps",
            "3",
            "--burn",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "bare weight-streaming bound" in result.output and "speedup" in result.output
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"dense", "streamingllm", "longmem", "h2o"}
    assert data["policies"]["dense"]["over_dense_time"] == 1.0
    steps = data["device_steps"]  # (h2o and the band choose on the device: timed both ways)
    assert set(steps) == {"h2o", "streamingllm"} and steps["h2o"]["host_ms"] == data["policies"]["h2o"]["ms_per_token"]
    assert steps["h2o"]["device_ms"] > 0 and "evictions chosen on the host and on the device" in result.output
    assert set(data["streamingllm_vs_recompute"]) == {"16", "32"}
    assert all(v["speedup"] > 0 for v in data["streamingllm_vs_recompute"].values())
    assert "exact chunked feeding vs token by token" in result.output
    rows = {(r["policy"], r["budget"]) for r in data["exact"]}
    assert rows == {
        ("dense", None),
        *((p, b) for p in ("window", "streamingllm", "recompute-window") for b in (16, 32)),
    }
    assert all(r["speedup"] > 0 for r in data["exact"])
    grouped = data["grouped"]
    assert grouped["policies"] == ["sirllm", "h2o", "tova", "knorm", "snapkv"] and grouped["tokens"] == 48
    assert grouped["speedup"] > 0 and grouped["max_abs_logit_diff"] < 1e-4  # (the same numbers)
    if exact_products_here():  # (the streams evicting in step: bit for bit, models/few_rows.py)
        assert {"sirllm", "h2o", "tova", "knorm"} <= set(grouped["bit_for_bit"])
    assert "one stream to 5 policies" in result.output and "bit for bit" in result.output
    replies = data["replies"]
    assert replies["tree"] and replies["replies"] == 3 and replies["max_abs_logit_diff"] < 1e-4
    assert "reply scoring (streamingllm" in result.output and "one tree forward" in result.output
    dialogue = data["dialogue"]
    assert dialogue["episodes"] == 2 and dialogue["items"] == 44 and dialogue["records_identical"]
    assert dialogue["speedup"] > 0 and dialogue["max_abs_logprob_diff"] < 1e-3
    assert "dialogue batched (2 grocery episodes" in result.output


def test_bench_rejects_bad_input():
    result = CliRunner().invoke(cli, ["bench", "--policy", "nope"])
    assert result.exit_code == 2 and "unknown policy 'nope'" in result.output
    result = CliRunner().invoke(cli, ["bench", "--exact-budgets", "1024", "--exact-tokens", "100"])
    assert result.exit_code == 2 and "--exact-tokens must be at least" in result.output
    result = CliRunner().invoke(cli, ["bench", "--group", "h2o,longmem"])
    assert result.exit_code == 2 and "--group: longmem cannot join a group" in result.output
    result = CliRunner().invoke(cli, ["bench", "--replies", "-1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["bench", "--dialogue", "1"])
    assert result.exit_code == 2 and "--replies >= 0" in result.output


def test_bench_batched_and_soak(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--policy",
            "dense",
            "--budget",
            "16",
            "--budgets",
            "",
            "--batch-sizes",
            "1,2",
            "--exact-budgets",
            "",
            "--soak",
            "300",
            "--soak-budget",
            "24",
            "--soak-chunk",
            "7",
            "--steps",
            "2",
            "--burn",
            "0",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["batched"]["rows"]) == {"1", "2"}
    soak = data["soak"]
    assert soak["tokens"] == 300 and soak["kv_constant"]
    assert soak["kv_bytes_values"] == [24 * 2 * 2 * 2 * 16 * 4]  # budget x K,V x layers x kv heads x head dim x fp32
    assert "flat" in result.output
