"""Ctrl-C, SIGTERM, full and read-only disks: the exit code promised, one line, every finished
result kept, no partial file. Interrupts wait for what the program reports (a progress bar for the
second policy), never for a time; where a fixed delay is used, any moment must give the same outcome."""

import errno
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.results.store import Store


def start(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "streambench", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def wait_for(stream, needle: bytes) -> bytes:
    """Read a stream until `needle` appears (the program said it got there)."""
    seen = b""
    while needle not in seen:
        chunk = stream.read1(256) if hasattr(stream, "read1") else stream.read(1)
        if not chunk:
            raise AssertionError(f"stream ended before {needle!r}: {seen[-500:]!r}")
        seen += chunk
    return seen


def no_partial_files(folder: Path) -> bool:
    return (
        not any(p.name.endswith(".tmp") or p.name.startswith(".") for p in folder.rglob("*"))
        if folder.exists()
        else True
    )


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_mid_run_keeps_the_finished_run(tmp_path, tiny_model_dir, small_text, sig, code):
    out = tmp_path / "out"
    proc = start(
        [
            "run",
            "--model",
            tiny_model_dir,
            "--text",
            small_text,
            "--tokens",
            "3000",
            "--budget",
            "16",
            "--policy",
            "dense,window",
            "--feed",
            "token",  # (seconds per run, not the milliseconds of exact chunks: the signal lands inside it)
            "--out",
            out,
        ]
    )
    seen = wait_for(proc.stderr, b"window")  # the second run's progress bar: the first has finished
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = (seen + err).decode()
    assert proc.returncode == code, err
    assert "Interrupted: 1 finished run(s) kept" in err and "Traceback" not in err
    assert [p.name.split("-")[1] for p in out.glob("*.json")] == ["dense"]
    assert no_partial_files(out)


def test_sigint_early_during_imports_or_model_load_exits_130(tmp_path, tiny_model_dir, small_text):
    """Whatever the moment (imports, planning, loading), Ctrl-C is exit 130 with one line."""
    for delay in (0.5, 1.5):
        out = tmp_path / f"out{delay}"
        proc = start(["run", "-q", "--model", tiny_model_dir, "--text", small_text, "--tokens", "3000", "--out", out])
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # finished before the signal: nothing to check at this moment
        assert proc.returncode == 130, err
        assert b"Traceback" not in err and b"Aborted" not in err
        assert len([line for line in err.decode().splitlines() if line.strip()]) == 1, err
        assert no_partial_files(out)


# ---- disks ---------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only); yields (mount point, mount options)."""
    mounts = []

    def mount(options: str) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size=256k,{options}", "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
        mounts.append(point)
        return point

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(point: Path) -> None:
    with open(point / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.fixture
def no_model_load(monkeypatch):
    from streambench.models import loading as models

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(models, "load", refuse)


@pytest.mark.parametrize("options,needle", [("rw", "no space left on device"), ("ro", "read-only file system")])
def test_unwritable_outputs_fail_before_the_model_loads(
    small_disk, options, needle, tmp_path, tiny_model_dir, small_text, no_model_load
):
    disk = small_disk(options)
    if options == "rw":
        fill(disk)
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--text",
            str(small_text),
            "--tokens",
            "32",
            "--policy",
            "window",
            "--budget",
            "8",
            "--out",
            str(disk / "out"),
        ],
    )
    assert result.exit_code == 2 and needle in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "models": [str(tiny_model_dir)],
                "policies": ["window"],
                "budgets": [8],
                "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 16}],
                "device": "cpu",
                "store": str(disk / "s.sqlite"),
                "out": str(tmp_path / "json"),
            }
        )
    )
    result = CliRunner().invoke(cli, ["sweep", "-q", str(spec)])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not (disk / "s.sqlite").exists()


def test_a_full_result_disk_mid_run_keeps_what_finished(tmp_path, tiny_model_dir, small_text, monkeypatch):
    from streambench.results import schema as results

    real, calls = results.os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(results.os, "replace", replace)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--text",
            str(small_text),
            "--tokens",
            "32",
            "--policy",
            "dense,window,streamingllm",
            "--budget",
            "8",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "no space left on device" in line and "1 finished run(s) kept" in line and "\n" not in line
    assert len(list(out.glob("*.json"))) == 1 and no_partial_files(out)


def test_a_store_that_fills_mid_sweep_stays_consistent_with_its_json(tmp_path, tiny_model_dir, small_text, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "models": [str(tiny_model_dir)],
                "policies": ["window", "streamingllm"],
                "budgets": [8, 12],
                "device": "cpu",
                "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 24}],
                "store": str(tmp_path / "s.sqlite"),
                "out": str(tmp_path / "json"),
            }
        )
    )
    real, calls = Store.add, []

    def add(self, result):
        calls.append(result["run_id"])
        if len(calls) == 3:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, result)

    monkeypatch.setattr(Store, "add", add)
    result = CliRunner().invoke(cli, ["sweep", "-q", str(spec)])
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert "cannot write to the store" in message and "database or disk is full" in message
    assert f"run {calls[2]} was not kept" in message and "2 run(s) finished by this sweep are in" in message
    with Store(tmp_path / "s.sqlite", readonly=True) as store:
        stored = {r["run_id"] for r in store.rows()}
    assert stored == {p.stem for p in (tmp_path / "json").glob("*.json")} == set(calls[:2])  # store == folder
    monkeypatch.setattr(Store, "add", real)
    resumed = CliRunner().invoke(cli, ["sweep", "-q", str(spec)])
    assert "2 finished, 0 failed, 2 already" in resumed.output, resumed.output


def test_the_size_guard_refuses_before_allocating(tmp_path, tiny_model_dir, monkeypatch, no_model_load):
    from streambench.models import size_guard as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)  # a 1 GiB machine
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--task",
            "grocery",
            "--policy",
            "streamingllm",
            "--budget",
            "100000000",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "a KV cache of 100,000,000 tokens needs" in result.output and "only 1.0 GiB is free" in result.output
    bank = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--task",
            "grocery",
            "--policy",
            "longmem",
            "--budget",
            "64",
            "-p",
            "bank_tokens=100000000",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert bank.exit_code == 2 and "a memory bank of 100,000,000 tokens" in bank.output, bank.output
    assert not (tmp_path / "o").exists()


def test_a_budget_above_the_stream_allocates_only_the_stream(tmp_path, tiny_model_dir, small_text):
    import json

    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--text",
            str(small_text),
            "--tokens",
            "40",
            "--policy",
            "streamingllm",
            "--budget",
            "1000000000",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(next(tmp_path.glob("*.json")).read_text())["metrics"]
    assert metrics["kv_allocated_mib"] < 1  # 41 slots, not a billion
