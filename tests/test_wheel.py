"""The wheel is the product: built from this checkout and installed non-editable, away from any
repository, it lists the shipped presets and runs the lm-eval task's default offline tasks. An
editable install (install.sh) would find files through the checkout and hide a missing one."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ROOT / "streambench" / "presets"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, wheel): the wheel built with this environment's setuptools (no download)
    and unpacked by pip into a bare folder that goes first on PYTHONPATH."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        cwd=out,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = out.glob("streambench-*.whl")
    site = out / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    return site, wheel


def _streambench(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "streambench", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def test_the_wheel_carries_every_preset_and_the_lm_eval_files(installed):
    _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in PRESETS.rglob("*") if p.is_file() and p.name != "__init__.py"}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "streambench/py.typed" in names and any(
        n.endswith("dist-info/LICENSE") or "licenses/LICENSE" in n for n in names
    )


def test_the_installed_wheel_is_imported_from_its_own_folder_and_lists_the_presets(installed, tmp_path):
    site, _ = installed
    where = _streambench(site, tmp_path, "--version")
    assert where.returncode == 0, where.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import streambench; print(streambench.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert Path(probe.stdout.strip()).is_relative_to(site), probe.stdout  # not this checkout
    listing = _streambench(site, tmp_path, "list", "presets")
    assert listing.returncode == 0, listing.stderr
    for kind in ("policies", "tasks"):
        for preset in (PRESETS / kind).glob("*.yaml"):
            assert f"  {preset.stem} " in listing.stdout, (preset.stem, listing.stdout)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_default_lm_eval_tasks_offline(installed, tiny_model_dir, tmp_path):
    site, _ = installed
    result = _streambench(
        site,
        tmp_path,
        "lm-eval",
        "-q",
        "--model",
        str(tiny_model_dir),
        "--policy",
        "streamingllm",
        "--budget",
        "200",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "streambench_mc/acc" in result.stdout and "streambench_ppl/word_perplexity" in result.stdout
