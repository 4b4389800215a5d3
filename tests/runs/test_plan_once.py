"""Decisions are made once on the way from a command to a result: the plan (task, budget, sizes,
decode mode, the fit on the device) is made once per config, and the runner, the CLI and a sweep
pass it down instead of planning again."""

import pytest
import yaml
from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.models import size_guard
from streambench.policies.build import PolicySpec
from streambench.runs import runner
from streambench.runs.config import RunConfig


@pytest.fixture
def counted(monkeypatch):
    """Counts of runner.plan and size_guard.check_fits calls, through the real functions."""
    calls = {"plan": 0, "fits": 0}
    plan, fits = runner.plan, size_guard.check_fits

    def counting_plan(*args, **kwargs):
        calls["plan"] += 1
        return plan(*args, **kwargs)

    def counting_fits(*args, **kwargs):
        calls["fits"] += 1
        return fits(*args, **kwargs)

    monkeypatch.setattr(runner, "plan", counting_plan)
    monkeypatch.setattr(size_guard, "check_fits", counting_fits)
    return calls


def test_a_run_given_its_plan_does_not_plan_or_fit_again(counted, tiny_model_dir, small_text, tmp_path):
    config = RunConfig(
        model=str(tiny_model_dir),
        device="cpu",
        budget=16,
        policies=[PolicySpec("streamingllm"), PolicySpec("window")],
        task_args={"text": str(small_text), "tokens": 32},
        out=str(tmp_path),
    )
    made = runner.plan(config)
    assert counted == {"plan": 1, "fits": 2} and all(item.fits_checked for item in made.runs)
    results = list(runner.run(config, planned=made))
    assert len(results) == 2 and counted == {"plan": 1, "fits": 2}


def test_the_run_command_plans_once(counted, tiny_model_dir, small_text, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["run", "-q", "--model", str(tiny_model_dir), "--text", str(small_text), "--tokens", "32"]
        + ["--policy", "window", "--budget", "16", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    assert counted == {"plan": 1, "fits": 1}


def test_a_sweep_plans_each_config_once(counted, tiny_model_dir, small_text, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "models": [str(tiny_model_dir)],
                "budgets": [8, 16],
                "policies": ["window", "streamingllm"],
                "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 24}],
                "store": str(tmp_path / "store.sqlite"),
                "out": str(tmp_path / "json"),
                "device": "cpu",
            }
        )
    )
    result = CliRunner().invoke(cli, ["sweep", "-q", str(spec)])
    assert result.exit_code == 0, result.output
    assert counted == {"plan": 2, "fits": 4}  # two budgets: two configs of two policies each
