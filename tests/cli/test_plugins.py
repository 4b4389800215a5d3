"""Policies and tasks from outside the package: a file (`path.py:Class`), a module
(`package.module:Class`) and an installed distribution's entry points (the example package under
examples/plugin), in `run`, `sweep` and `list`; each result records where its code came from;
a missing or broken plugin is one line and exit 2; a file plugin is refused under Ray."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from reference import ReferenceStream
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies import POLICIES
from streambench.policies.build import PolicySpec, build_policy
from streambench.registry import PluginError, Registry

ROOT = Path(__file__).resolve().parents[2]
FILE_PLUGIN = ROOT / "examples" / "my_policy.py"


def cli(*args, env_path=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": env_path or ""}
    return subprocess.run(
        [sys.executable, "-m", "streambench", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=600,
    )


def test_a_file_plugin_keeps_tokens_exactly():
    """The example file plugin's keep-set, through the engine, equals the independent reference."""
    name = f"{FILE_PLUGIN}:KeepEveryOther"
    model = tiny_model("llama", layers=2)
    session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, {}), 14))
    ids = torch.randint(3, 96, (1, 50), generator=torch.Generator().manual_seed(2))
    with ReferenceStream(model, build_policy(PolicySpec(name, {}), 14)) as reference:
        for t in range(50):
            torch.testing.assert_close(
                session.feed(ids[:, t : t + 1]), reference.feed(ids[:, t : t + 1]), atol=1e-4, rtol=0
            )
    kept = session.cache.positions
    assert len(kept) <= 14 and session.cache.evictions > 5
    origin = POLICIES.origin(name)
    assert origin["kind"] == "file" and origin["sha256"] == hashlib.sha256(FILE_PLUGIN.read_bytes()).hexdigest()


def test_a_module_plugin_and_its_origin(tmp_path, monkeypatch):
    (tmp_path / "my_policies.py").write_text(
        "from dataclasses import dataclass\n"
        "from streambench.policies.window import WindowPolicy\n"
        "@dataclass\nclass Short(WindowPolicy):\n    summary = 'a window'\n"
        "class NotAPolicy:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = POLICIES.get("my_policies:Short")
    assert cls.name == "my_policies:Short" and cls(budget=8).budget == 8
    assert POLICIES.origin("my_policies:Short")["module"] == "my_policies"
    with pytest.raises(PluginError, match="must be a class subclassing CachePolicy"):
        POLICIES.get("my_policies:NotAPolicy")
    with pytest.raises(PluginError, match="has no 'Missing'"):
        POLICIES.get("my_policies:Missing")
    with pytest.raises(PluginError, match="failed to import: ModuleNotFoundError"):
        POLICIES.get("no_such_module_here:Thing")


def test_entry_points_are_found_lazily_and_recorded(plugin_site, monkeypatch):
    for part in plugin_site.split(os.pathsep):
        monkeypatch.syspath_prepend(part)
    registry = Registry("policy", POLICIES.base, group="streambench.policies")  # a fresh one: no cached scan
    assert "strided" in registry
    origin = registry.origin("strided")
    assert origin == {
        "kind": "entry-point",
        "group": "streambench.policies",
        "value": "streambench_strided:StridedPolicy",
        "distribution": "streambench-strided",
        "version": "0.1.0",
    }
    policy = registry.get("strided")(budget=20)
    assert (policy.start_size, policy.recent_size) == (4, 8)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("./nope.py:Thing", "policy plugin file not found: ./nope.py"),
        ("{broken}:Thing", "failed to import: ZeroDivisionError: division by zero"),
        ("{broken}:", "expected path/to/file.py:ClassName"),
        ("{plain}:Plain", "is not a policy: it must be a class subclassing CachePolicy"),
    ],
)
def test_a_missing_or_broken_plugin_is_one_line_and_exit_2(tmp_path, spec, message):
    broken, plain = tmp_path / "broken.py", tmp_path / "plain.py"
    broken.write_text("x = 1 / 0\n")
    plain.write_text("class Plain:\n    pass\n")
    result = cli(
        "run", "-q", "--out", tmp_path / "out", "--policy", spec.format(broken=broken, plain=plain), "--tokens", 8
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_broken_entry_point_is_listed_as_broken_not_fatal(tmp_path, plugin_site):
    site = tmp_path / "site"
    info = site / "bad_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugin\nVersion: 1.0\n")
    info.joinpath("entry_points.txt").write_text("[streambench.policies]\nbad = no_such_module_xyz:Policy\n")
    result = cli("list", "policies", env_path=os.pathsep.join([str(site), plugin_site]))
    assert result.returncode == 0, result.stderr
    assert "bad                BROKEN: policy plugin 'bad' (no_such_module_xyz:Policy) failed to load" in result.stdout
    assert (
        "strided" in result.stdout
        and "(plugin: streambench-strided 0.1.0, streambench_strided:StridedPolicy)" in result.stdout
    )
    run = cli("run", "-q", "--policy", "bad", "--tokens", 8, "--out", tmp_path / "o", env_path=str(site))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1


def test_plugins_run_and_sweep_from_the_cli_and_results_say_what_ran(tmp_path, tiny_model_dir, small_text, plugin_site):
    """A file plugin and an entry-point policy and task, in `run` and in a local `sweep`."""
    out = tmp_path / "run"
    result = cli(
        "run",
        "-q",
        "--model",
        tiny_model_dir,
        "--task",
        "lorem-ppl",
        "--tokens",
        48,
        "--budget",
        16,
        "--policy",
        f"{FILE_PLUGIN}:KeepEveryOther,strided,streamingllm",
        "--out",
        out,
        env_path=plugin_site,
    )
    assert result.returncode == 0, result.stderr
    results = {r["config"]["policy"]["name"]: r for r in map(json.loads, map(Path.read_text, out.glob("*.json")))}
    assert set(results) == {f"{FILE_PLUGIN}:KeepEveryOther", "strided", "streamingllm"}
    file_result = results[f"{FILE_PLUGIN}:KeepEveryOther"]
    assert file_result["config"]["policy"]["origin"]["sha256"] == hashlib.sha256(FILE_PLUGIN.read_bytes()).hexdigest()
    assert "path" not in file_result["config"]["policy"]["origin"]  # the hash does not depend on where the clone is
    assert file_result["provenance"]["policy"]["path"] == str(FILE_PLUGIN)
    assert results["strided"]["config"]["policy"]["origin"]["distribution"] == "streambench-strided"
    assert results["strided"]["config"]["task"]["origin"]["value"] == "streambench_strided:LoremPerplexity"
    assert "origin" not in results["streamingllm"]["config"]["policy"]
    assert all(np.isfinite(r["metrics"]["ppl"]) for r in results.values())

    spec = {
        "models": [str(tiny_model_dir)],
        "budgets": [16],
        "device": "cpu",
        "policies": [f"{FILE_PLUGIN}:KeepEveryOther", "strided"],
        "tasks": [
            {"task": "lorem-ppl", "tokens": 40},
            {
                "task": f"{ROOT / 'examples' / 'plugin' / 'src' / 'streambench_strided' / '__init__.py'}:LoremPerplexity",
                "tokens": 32,
            },
        ],
        "store": str(tmp_path / "store.sqlite"),
        "out": str(tmp_path / "json"),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    swept = cli("sweep", "-q", path, env_path=plugin_site)
    assert swept.returncode == 0, swept.stderr + swept.stdout
    assert "4 finished" in swept.stdout
    report = cli("report", "--store", tmp_path / "store.sqlite", "--out", tmp_path / "report", env_path=plugin_site)
    assert report.returncode == 0, report.stderr


def test_a_file_plugin_under_ray_is_refused_in_one_line(tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    spec = {
        "models": [str(tiny_model_dir)],
        "budgets": [16],
        "device": "cpu",
        "policies": [f"{FILE_PLUGIN}:KeepEveryOther"],
        "tasks": [{"task": "perplexity", "tokens": 16}],
        "store": str(tmp_path / "s.sqlite"),
        "out": str(tmp_path / "j"),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = cli("sweep", "-q", "--engine", "ray", path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: policy {FILE_PLUGIN}:KeepEveryOther is a file plugin, which Ray workers cannot import: install it as a "
        "package with a streambench.policies entry point, or use --engine local"
    ]


def test_plugin_classes_must_subclass_the_base_even_when_registered_in_code():
    with pytest.raises(TypeError, match="must subclass CachePolicy"):
        POLICIES.register("not-a-policy")(type("X", (), {}))
    assert isinstance(PluginError("x"), ConfigError)
