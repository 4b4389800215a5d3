"""Sweeps on a local Ray cluster (2 CPUs): every run lands in the store, a planted failing run is
recorded after its retries while the others finish, a killed sweep resumes without redoing
finished runs, and the quality metrics equal those of the local engine."""

import sys

import pytest
import yaml
from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.results.store import Store
from streambench.runs.sweep import load_spec, run_sweep

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(embedded, plugin_site):  # `embedded`: the model's safetensors cache exists before workers race for it
    # the example plugin package is "installed" on the workers (its entry points on their path)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": plugin_site}},
    )
    yield
    ray.shutdown()


def write_spec(tmp_path, **extra):
    spec = {
        "models": ["smollm2-135m"],
        "budgets": [16],
        "policies": ["dense", "window", "streamingllm", "sirllm"],
        "tasks": [{"task": "perplexity", "tokens": 40}],
        "device": "cpu",
        "retries": 1,
        "store": str(tmp_path / "store.sqlite"),
        "out": str(tmp_path / "json"),
    }
    spec.update(extra)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_no_cluster_at_the_address_is_one_line(tmp_path, monkeypatch):  # runs before the module's cluster starts
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = CliRunner().invoke(cli, ["sweep", "-q", "--engine", "ray", "--address", "auto", str(write_spec(tmp_path))])
    assert result.exit_code == 2
    assert "cannot start or join a Ray cluster at auto" in result.output
    assert not ray.is_initialized()


def test_ray_sweep_stores_every_run_records_a_planted_failure_and_matches_local(cluster, tmp_path):
    missing = tmp_path / "no-such-model"  # planted: plans fine, fails on the worker, every attempt
    spec_path = write_spec(
        tmp_path, models=["smollm2-135m", str(missing)], policies=["window", "streamingllm", "sirllm"]
    )
    result = CliRunner().invoke(cli, ["sweep", "-q", "--engine", "ray", str(spec_path)], catch_exceptions=False)
    assert result.exit_code == 1, result.output  # runs failed (and are recorded)
    assert result.output.strip().endswith(f"3 finished, 3 failed, 0 already in {tmp_path / 'store.sqlite'}")
    assert result.output.count("retrying") == 3 and result.output.count("FAILED") == 3
    with Store(tmp_path / "store.sqlite") as store:
        rows = store.rows()
        failed = [r for r in rows if r["status"] == "failed"]
        assert len(rows) == 6 and len(failed) == 3
        assert all(r["error"].startswith("attempt 2 of 2: cannot load model") for r in failed)
        ray_results = {r["config_hash"]: r for r in store.results()}
    assert all(r["environment"].get("ray_node") for r in ray_results.values())
    assert len(list((tmp_path / "json").glob("*.json"))) == 3  # the driver writes each result's JSON too

    local_dir = tmp_path / "local"
    local_dir.mkdir()
    local_spec = load_spec(write_spec(local_dir, policies=["window", "streamingllm", "sirllm"]))
    with Store(local_dir / "store.sqlite") as store:
        assert run_sweep(local_spec, store)["finished"] == 3
        local = {r["config_hash"]: r for r in store.results()}
    assert local.keys() == ray_results.keys()  # same config hashes under either engine
    for digest, r in local.items():  # Ray workers run torch with 1 thread: fp32 sums in another order
        for name in ("ppl", "ppl_last_half", "tokens", "kv_mib_peak"):
            assert ray_results[digest]["metrics"][name] == pytest.approx(r["metrics"][name], rel=1e-4), name


def test_a_killed_ray_sweep_resumes_without_redoing_finished_runs(cluster, tmp_path):
    from streambench.runs.ray_sweep import run_sweep_ray

    spec = load_spec(write_spec(tmp_path))
    seen = []

    def interrupt_after_first(event, info):
        if event == "finished":
            seen.append(info["config_hash"])
            raise KeyboardInterrupt

    with Store(tmp_path / "store.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep_ray(spec, store, report=interrupt_after_first)
        assert store.finished() == set(seen)
        stamp = {r["config_hash"]: r["finished"] for r in store.rows()}[seen[0]]
        counts = run_sweep_ray(spec, store)
        assert counts == {"finished": 3, "failed": 0, "skipped": 1, "elsewhere": 0}
        assert len(store.finished()) == 4
        assert {r["config_hash"]: r["finished"] for r in store.rows()}[seen[0]] == stamp  # not redone


def test_entry_point_plugins_run_on_ray_workers(cluster, tmp_path, tiny_model_dir, plugin_site, monkeypatch):
    """A policy and a task installed as a distribution (entry points) resolve on the driver and on
    the workers; the results record the distribution."""
    import os

    from streambench.policies import POLICIES
    from streambench.tasks import TASKS

    for part in plugin_site.split(os.pathsep):
        monkeypatch.syspath_prepend(part)
    for registry in (POLICIES, TASKS):
        monkeypatch.setattr(registry, "_entry_points", None)  # scan again, with the plugin on the path
    spec = load_spec(
        write_spec(
            tmp_path,
            models=[str(tiny_model_dir)],
            policies=["strided", "streamingllm"],
            tasks=[{"task": "lorem-ppl", "tokens": 32}],
        )
    )
    from streambench.runs.ray_sweep import run_sweep_ray

    with Store(tmp_path / "store.sqlite") as store:
        assert run_sweep_ray(spec, store)["finished"] == 2
        results = {r["config"]["policy"]["name"]: r for r in store.results()}
    assert results["strided"]["config"]["policy"]["origin"]["distribution"] == "streambench-strided"
    assert results["strided"]["config"]["task"]["origin"]["value"] == "streambench_strided:LoremPerplexity"
    assert all(r["environment"].get("ray_node") for r in results.values())


def test_ray_engine_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = CliRunner().invoke(cli, ["sweep", "--engine", "ray", str(write_spec(tmp_path))])
    assert result.exit_code == 2
    assert "pip install 'streambench[ray]'" in result.output


def test_sweep_spec_resources_are_checked(tmp_path):
    result = CliRunner().invoke(cli, ["sweep", str(write_spec(tmp_path, resources={"gpus": 1}))])
    assert result.exit_code == 2 and "unknown resource(s) gpus" in result.output
    spec = load_spec(write_spec(tmp_path, resources={"num_gpus": 0.5, "memory": "2GiB"}))
    assert spec.resources == {"num_gpus": 0.5, "memory": 2 * 2**30}


def test_what_ray_raises_is_one_line_and_retried_unless_a_bad_argument():
    from ray.exceptions import NodeDiedError, RayTaskError, WorkerCrashedError

    from streambench.errors import ConfigError, DataError
    from streambench.runs.ray_sweep import describe

    assert describe(WorkerCrashedError())[1] is True  # the worker process died: try again elsewhere
    message, retry = describe(NodeDiedError("node 1a2b died"))
    assert retry is True and "node 1a2b died" in message and "\n" not in message
    wrapped = RayTaskError(
        "execute_run", "Traceback ...\nstreambench.errors.DataError: gone", DataError("text x.txt is gone")
    )
    assert describe(wrapped) == ("text x.txt is gone", True)  # maybe present on another node
    bad = RayTaskError("execute_run", "Traceback ...", ConfigError("budget 2 must be above start_size 4"))
    assert describe(bad) == ("budget 2 must be above start_size 4", False)
