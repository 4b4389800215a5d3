"""Every example in `--help`, the README and docs/ runs as written: offline ones to completion (with
their sizes cut to a few tokens, rounds or steps), network and GPU ones to their one-line error
(exit 2) on this offline, GPU-less machine. Each runs in a scratch folder holding copies of
examples/ and ci/ (presets ship in the package); the `sweep` examples and those that read their
store (`report`, `gate`, `import`, `export`) share one, in order. One test per example, so that the
suite's workers share them out."""

import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from streambench.cli.app import cli

ROOT = Path(__file__).resolve().parents[2]

# Examples that need the network, a GPU or a Ray cluster: here they must end in one `Error:` line.
OFFLINE_ERROR = ("--device cuda", "--dataset", "Qwen/", "meta-llama/", "https://", "arc_easy")
# Examples on a file the user supplies (a PG19 book): here they must end in one `Error:` line too.
USER_DATA = ("pg19/",)
# A Ray cluster to join: one line when there is work to send and no cluster; nothing to do is fine.
MAY_FAIL = ("--address",)
# Sizes cut so that the offline examples finish in seconds (the example's own values otherwise).
CUTS = {
    "--tokens": "40",
    "--limit": "1",
    "--steps": "2",
    "--soak": "128",
    "--budgets": "16",
    "--exact-budgets": "16",
    "--exact-tokens": "128",
    "--group-tokens": "8",
}
ADDED = {  # (flag, value or None), added when the example does not set the flag itself
    "run": [("-q", None)],
    "lm-eval": [("-q", None), ("--limit", "2")],
    "bench": [
        ("--steps", "2"),
        ("--burn", "0"),
        ("--budgets", "16"),
        ("--batch-sizes", "2"),
        ("--exact-budgets", "16"),
        ("--exact-tokens", "128"),
        ("--group-tokens", "8"),
        ("--replies", "2"),
        ("--dialogue", "0"),  # (tests/runs/test_bench.py plays it on a tiny model)
    ],
    "sweep": [("-q", None)],
}
SOAK = [("--soak-chunk", "64"), ("--soak-budget", "32")]
DIALOGUE = ("rps", "grocery", "dailydialog", "kvpress-eval")  # tasks whose --limit counts items, rounds or rows
NEEDLE = ("needle", "passkey", "needle-long")  # cut to one 64-token cell


def help_examples() -> list[str]:
    out = []
    for name in ("run", "sweep", "report", "gate", "import", "export", "lm-eval", "bench", "list", "chat"):
        text = CliRunner().invoke(cli, [name, "-h"]).output
        if "Examples:" in text:
            block = text.split("Examples:", 1)[1]
            out += [line.strip() for line in block.splitlines() if line.strip().startswith("streambench ")]
    return out


def readme_examples() -> list[str]:
    out = []
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("streambench "):
                out += [part.strip() for part in line.split(";")]
    return out


def adapt(example: str) -> tuple[list[str], str | None]:
    """argv for the CLI with sizes cut, and the file a `>` redirect names."""
    redirect = None
    if " > " in example:
        example, redirect = (s.strip() for s in example.split(" > ", 1))
    argv = shlex.split(example)[1:]
    command = argv[0] if argv and not argv[0].startswith("-") else None
    for i, arg in enumerate(argv[:-1]):
        if arg in CUTS and argv[i + 1] != "''" and argv[i + 1] != "":
            argv[i + 1] = CUTS[arg]
    extra = list(ADDED.get(command, []))
    if command == "bench" and "--soak" in argv:
        extra += SOAK
    if command == "run":
        task = argv[argv.index("--task") + 1] if "--task" in argv else "perplexity"
        extra.append(
            ("--limit", "1") if task in DIALOGUE else ("--tokens", "40") if task == "perplexity" else ("-q", None)
        )
        if task in NEEDLE:
            argv += ["-t", "lengths=64", "-t", "depths=50"]
    for flag, value in extra:
        if flag not in argv:
            argv += [flag] + ([value] if value is not None else [])
    return argv, redirect


# Examples that read what an earlier one wrote (a sweep's store, results/): one test, in this order,
# in one folder, after the default run; every other example runs as a test of its own.
CHAIN = ("sweep", "report", "gate", "import", "export")


def _command(example: str) -> str:
    words = example.split()
    return words[1] if len(words) > 1 else ""


def _key(example: str) -> tuple:
    """An example as what it runs: the same flags written in another order run once."""
    argv, redirect = adapt(example)
    items, i = [], 1
    while i < len(argv):
        value = (
            argv[i + 1] if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
        )
        items.append((argv[i], value))
        i += 2 if value is not None else 1
    return tuple(argv[:1]), tuple(sorted(items, key=str)), redirect


def examples() -> list[str]:
    out, seen = [], set()
    for example in dict.fromkeys(help_examples() + readme_examples()):
        key = _key(example)
        if key not in seen:
            seen.add(key)
            out.append(example)
    return out


EXAMPLES = examples()
FIRST_RUN = next(e for e in EXAMPLES if _command(e) == "run")
CHAINED = (
    [FIRST_RUN]
    + [e for e in EXAMPLES if _command(e) == "sweep"]
    + [e for e in EXAMPLES if _command(e) in CHAIN and _command(e) != "sweep"]
)
ALONE = [e for e in EXAMPLES if e not in CHAINED]


@pytest.fixture
def scratch(tmp_path, monkeypatch, embedded):
    """A folder holding copies of examples/ and ci/ (presets ship in the package), the working
    directory of the examples; the embedded model is loaded once per test session, the rest as
    the example says."""
    from streambench.models import loading as models

    for name in ("examples", "ci"):
        shutil.copytree(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    real = models.load

    def load(name, device="auto", *args, **kwargs):
        if name in models.EMBEDDED_ALIASES:
            models.resolve_device(device)  # --device cuda still says CUDA is missing
            return embedded
        return real(name, device, *args, **kwargs)

    monkeypatch.setattr(models, "load", load)
    return tmp_path


def run_example(example: str, scratch: Path) -> str | None:
    """What is wrong with running the example here, or None."""
    argv, redirect = adapt(example)
    if "--engine" in argv and "ray" in argv and "--address" not in argv:
        return None  # a local Ray cluster: tests/runs/test_ray.py runs this very path
    started = time.perf_counter()
    result = CliRunner().invoke(cli, argv)
    print(f"{time.perf_counter() - started:6.1f} s  {' '.join(argv)}")
    lines = [line for line in result.output.splitlines() if line.strip()]
    one_error = result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error:")
    if any(marker in example for marker in MAY_FAIL) and (result.exit_code == 0 or one_error):
        return None
    network = (
        any(marker in example for marker in OFFLINE_ERROR + USER_DATA)
        or ("--task dailydialog" in example and "--data" not in example)  # builds its items from the hub
        or ("--task mtbench" in example and "--data" not in example)  # reads upstream's mt_bench.jsonl
    )
    if network:
        if (
            result.exit_code != 2
            or len([line for line in lines if line.startswith("Error:")]) != 1
            or "Traceback" in result.output
        ):
            return f"{example}: expected one offline error line, exit 2; got {result.exit_code}: {result.output[-400:]}"
    elif result.exit_code != 0:
        return f"{example} -> {' '.join(argv)}: exit {result.exit_code}: {result.output[-600:]}"
    elif redirect:
        (scratch / redirect).write_text(result.output)
    return None


def test_help_and_readme_name_no_missing_file():
    for example in help_examples() + readme_examples():
        for token in shlex.split(example.split(" > ")[0]):
            if token.startswith(("policies/", "tasks/", "examples/", "ci/")):
                assert (ROOT / token).exists(), f"{example}: {token} does not exist"
            assert "../shared" not in token, example


def test_examples_are_all_collected():
    assert len(EXAMPLES) > 50 and sorted(CHAINED + ALONE) == sorted(EXAMPLES)
    assert {_command(e) for e in CHAINED} == {"run", *CHAIN}


@pytest.mark.slow
@pytest.mark.parametrize("example", ALONE, ids=[f"{i:02d}-{_command(e)}" for i, e in enumerate(ALONE)])
def test_example_runs_as_written(example, scratch):
    failure = run_example(example, scratch)
    assert failure is None, failure


@pytest.mark.slow
def test_sweep_report_gate_import_export_examples_run_in_order(scratch):
    failures = [f for f in (run_example(e, scratch) for e in CHAINED) if f]
    assert not failures, "\n".join(failures)
    assert (scratch / "results" / "streambench.sqlite").exists() and (scratch / "report" / "report.html").exists()
    assert (scratch / "runs.csv").read_text().startswith("run_id,")
