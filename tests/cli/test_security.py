"""Security regressions: hostile labels in the HTML report, databases streambench did not make,
run identity (labels), downloads cached by URL, concurrent sweeps on one store."""

import hashlib
import json
import shutil
import sqlite3
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.results.store import Store

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "\"'><svg onload=alert(3)>",
    "$\\frac{a}{b}$ | `x`",
]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory, tiny_model_dir, small_text):
    root = tmp_path_factory.mktemp("hostile")
    spec = {
        "models": [str(tiny_model_dir)],
        "budgets": [8, 12],
        "device": "cpu",
        "policies": [{"policy": "window", "label": label} for label in HOSTILE],
        "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 24}],
        "store": str(root / "store.sqlite"),
        "out": str(root / "json"),
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli, ["sweep", "-q", str(root / "spec.yaml")])
    assert result.exit_code == 0, result.output
    return root / "store.sqlite"


def test_report_escapes_every_hostile_string(hostile_store, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", "--store", str(hostile_store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    for label in HOSTILE[:3]:  # the ones with markup in them
        assert label not in page  # never raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert "onerror=alert(2)>" not in page and "<img src=x" not in page
    md = (out / "report.md").read_text()
    assert "<script>" not in md and "\\|" in md  # inline HTML escaped, pipes cannot break the table
    assert {p.name for p in out.glob("*.png")} >= {"perplexity_ppl_over_stream_b8.png"}  # math-text labels plotted


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="headless Chromium not installed (Debian package 'chromium'); the HTML is not rendered",
)
def test_no_script_runs_in_a_browser(hostile_store, tmp_path):
    """The DOM Chromium builds holds the hostile labels as text, and no element they name."""
    out = tmp_path / "report"
    CliRunner().invoke(cli, ["report", "--store", str(hostile_store), "--out", str(out)])
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            (out / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "<table" in dom and "streambench report" in dom  # the page rendered
    assert "<script" not in dom and "<svg" not in dom and '<img src="x"' not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # as text, in the table
    assert "&lt;img src=x onerror=alert(2)&gt;" in dom


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def foreign_files(tmp_path):
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE people (name TEXT)")
    db.execute("INSERT INTO people VALUES ('ada')")
    db.commit()
    db.close()
    runs = tmp_path / "runs.sqlite"
    db = sqlite3.connect(runs)
    db.execute("CREATE TABLE runs (id INTEGER, what TEXT)")
    db.commit()
    db.close()
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    return [other, runs, empty]


def test_foreign_databases_and_empty_files_stay_byte_for_byte_untouched(
    foreign_files, tmp_path, hostile_store, tiny_model_dir, small_text
):
    results = hostile_store.parent / "json"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "models": [str(tiny_model_dir)],
                "policies": ["window"],
                "budgets": [8],
                "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 16}],
                "device": "cpu",
                "out": str(tmp_path / "json"),
            }
        )
    )
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"schema": "streambench.baseline/1", "runs": {}}))
    for store in foreign_files:
        before = sha(store)
        neighbours = sorted(p.name for p in tmp_path.iterdir())
        for args in (
            ["report", "--store", store, "--out", tmp_path / "r"],
            ["export", "--store", store],
            ["gate", "--baseline", baseline, "--store", store],
            ["import", results, "--store", store],
            ["sweep", "-q", spec, "--store", store],
        ):
            result = CliRunner().invoke(cli, [str(a) for a in args])
            assert result.exit_code == 2, (args, result.output)
            assert "left untouched" in result.output or "holds no streambench results" in result.output, result.output
            assert sha(store) == before, args
        assert not (tmp_path / f"{store.name}-wal").exists() and not (tmp_path / f"{store.name}-shm").exists()
        assert {p.name for p in tmp_path.iterdir()} - set(neighbours) <= {"json"}  # the sweep's checked output folder


def test_read_only_commands_never_change_a_store(hostile_store, tmp_path):
    copy = tmp_path / "copy.sqlite"
    shutil.copy(hostile_store, copy)
    before = sha(copy)
    for args in (["report", "--store", copy, "--out", tmp_path / "r"], ["export", "--store", copy, "--format", "json"]):
        assert CliRunner().invoke(cli, [str(a) for a in args]).exit_code == 0
    assert sha(copy) == before and sorted(p.name for p in tmp_path.iterdir()) == ["copy.sqlite", "r"]


def test_a_corrupt_result_cell_is_one_line(hostile_store, tmp_path):
    copy = tmp_path / "copy.sqlite"
    shutil.copy(hostile_store, copy)
    db = sqlite3.connect(copy)
    db.execute("UPDATE runs SET result = '{not json' WHERE rowid = 1")
    db.commit()
    db.close()
    for args in (["report", "--store", copy, "--out", tmp_path / "r"], ["export", "--store", copy]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 2 and "is corrupt (not JSON)" in result.output, result.output


def test_two_labels_on_one_config_are_two_runs_everywhere(tmp_path, tiny_model_dir, small_text):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "models": [str(tiny_model_dir)],
                "budgets": [8],
                "device": "cpu",
                "policies": [
                    {"policy": "streamingllm", "start_size": 2, "label": "sinks-A"},
                    {"policy": "streamingllm", "start_size": 2, "label": "sinks-B"},
                    "streamingllm",
                ],
                "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 24}],
                "store": str(tmp_path / "s.sqlite"),
                "out": str(tmp_path / "json"),
            }
        )
    )
    result = CliRunner().invoke(cli, ["sweep", "-q", str(spec)])
    assert "3 finished" in result.output, result.output
    with Store(tmp_path / "s.sqlite", readonly=True) as store:
        labels = sorted(r["label"] for r in store.rows())
    assert labels == ["sinks-A", "sinks-B", "streamingllm"]
    assert len(list((tmp_path / "json").glob("*.json"))) == 3
    baseline = tmp_path / "b.json"
    CliRunner().invoke(cli, ["gate", "--baseline", str(baseline), "--store", str(tmp_path / "s.sqlite"), "--update"])
    assert len(json.loads(baseline.read_text())["runs"]) == 3
    report = tmp_path / "r"
    CliRunner().invoke(cli, ["report", "--store", str(tmp_path / "s.sqlite"), "--out", str(report)])
    md = (report / "report.md").read_text()
    assert "sinks-A" in md and "sinks-B" in md
    again = CliRunner().invoke(cli, ["sweep", "-q", str(spec)])
    assert "0 finished, 0 failed, 3 already" in again.output


def test_unlabelled_runs_keep_their_config_hashes():
    """The label enters the hash only when it differs from the policy name (ci/baseline.json)."""
    from streambench.policies.build import resolve_policy
    from streambench.runs.config import RunConfig
    from streambench.runs.runner import plan

    config = RunConfig(
        policies=[resolve_policy("streamingllm", {})],
        task_args={"tokens": 256},
        budget=64,
        device="cpu",
        dtype="float32",
    )
    from pathlib import Path

    baseline = json.loads((Path(__file__).resolve().parents[2] / "ci" / "baseline.json").read_text())
    (item,) = plan(config).runs
    assert "label" not in item.config
    assert item.digest == baseline["runs"]["perplexity/smollm2-135m/streamingllm/b64"]["config_hash"]


def test_downloads_are_cached_by_url_and_recorded(tmp_path, monkeypatch):
    import io

    from streambench.tasks.dialogue import items as dialogue_data

    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    served = {"http://host/a/keys.jsonl": b"first\n", "http://host/b/keys.jsonl": b"second\n"}
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(served[url])

    monkeypatch.setattr(dialogue_data.urllib.request, "urlopen", urlopen)
    a = dialogue_data.fetch("http://host/a/keys.jsonl")
    b = dialogue_data.fetch("http://host/b/keys.jsonl")
    assert a != b and a.read_bytes() == b"first\n" and b.read_bytes() == b"second\n"
    assert dialogue_data.fetch("http://host/a/keys.jsonl") == a and len(calls) == 2  # cached, per URL
    info = dialogue_data.provenance("http://host/b/keys.jsonl")
    assert info == {"source": "http://host/b/keys.jsonl", "sha256": hashlib.sha256(b"second\n").hexdigest()}
    served["http://host/x/..%2F..%2Fevil"] = b"x"
    path = dialogue_data.fetch("http://host/x/..%2F..%2Fevil")
    assert (tmp_path / "cache" / "data") in path.parents


def test_a_second_sweep_does_not_compute_a_claimed_run(tmp_path):
    path = tmp_path / "s.sqlite"
    first, second = Store(path), Store(path)
    try:
        assert first.claim("h1") is True
        assert second.claim("h1") is False  # a live process holds it
        assert second.claim("h2") is True
        first.close()  # releases its claims
        first = None
        assert second.claim("h1") is True
        with second.db:  # a claim left by a process that died is taken over
            second.db.execute(
                "INSERT OR REPLACE INTO claims VALUES ('h3', 'x:1:dead', ?, 999999999, '2026-01-01T00:00:00+00:00')",
                (__import__("socket").gethostname(),),
            )
        assert second.claim("h3") is True
    finally:
        if first is not None:
            first.close()
        second.close()
