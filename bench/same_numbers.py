"""Same numbers before and after a change that should move none (a refactor, a file move).

Runs a fixed set of `streambench run` command lines under two source trees, a git revision (a
temporary worktree) and this checkout, on the same machine one after the other, and compares
every metric of every run that does not measure time or process memory, exactly. Prints one row
per command line and exits 1 if any number moved.

    python bench/same_numbers.py bca5789            # that revision against this checkout
    python bench/same_numbers.py bca5789 --quick    # the first two command lines only

CPU only, embedded model: about 5 minutes per tree for the full set on 2 cores. DailyDialog is
read from ../shared/data (SirLLM's file); no command line touches the network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAILYDIALOG = ROOT.parent / "shared" / "data" / "sirllm" / "data" / "dailydialog" / "dailydialog.jsonl"
COMMANDS = [
    ["run"],  # the default run: 768 tokens of Hamlet, all six policies, budget 64
    ["run", "--tokens", "256", "--policy", "h2o,tova,knorm,snapkv,random", "--budget", "64"],
    ["run", "--task", "rps", "--limit", "12", "--policy", "streamingllm,sirllm", "--budget", "128"],
    ["run", "--task", "grocery", "--limit", "1", "--policy", "streamingllm,sirllm,h2o", "--budget", "256"],
    ["run", "--task", "dailydialog", "--data", str(DAILYDIALOG), "--limit", "12", "--policy", "window,random"]
    + ["--budget", "384"],
    [
        "run",
        "--task",
        "needle",
        "-t",
        "lengths=256",
        "-t",
        "depths=0,50",
        "--policy",
        "streamingllm,snapkv",
        "--budget",
        "64",
    ],
]
# what a run measures of the machine, not of the policy: compared nowhere
MACHINE = ("tokens_per_s", "decode_tokens_per_s", "seconds", "latency_", "rss_", "cuda_", "nvml_", "ttft_ms")


def run_all(tree: Path, out: Path, commands: list[list[str]]) -> list[list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    found = []
    for i, args in enumerate(commands):
        folder = out / f"c{i}"
        subprocess.run(
            [sys.executable, "-m", "streambench", *args, "-q", "--out", str(folder)],
            cwd=out,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        found.append([json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))])
    return found


def compared(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(k.startswith(m) or k == m for m in MACHINE)}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="the git revision to compare this checkout against")
    parser.add_argument("--quick", action="store_true", help="the first two command lines only")
    args = parser.parse_args()
    commands = COMMANDS[:2] if args.quick else COMMANDS
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.revision],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            (Path(tmp) / "a").mkdir()
            (Path(tmp) / "b").mkdir()
            before = run_all(base, Path(tmp) / "a", commands)
            after = run_all(ROOT, Path(tmp) / "b", commands)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    moved = 0
    print(f"{'command line':<90} {'runs':>4} {'numbers':>7}  verdict")
    for args_, old, new in zip(commands, before, after):
        old_by = {r["config_hash"]: r for r in old}
        new_by = {r["config_hash"]: r for r in new}
        numbers, diffs = 0, []
        if set(old_by) != set(new_by):
            diffs.append("different runs (config hashes)")
        for digest in sorted(set(old_by) & set(new_by)):
            a, b = compared(old_by[digest]["metrics"]), compared(new_by[digest]["metrics"])
            if set(a) != set(b):
                diffs.append(f"{old_by[digest]['label']}: metrics {sorted(set(a) ^ set(b))}")
            for key in sorted(set(a) & set(b)):
                numbers += 1
                if not same(a[key], b[key]):
                    diffs.append(f"{old_by[digest]['label']}.{key}: {a[key]!r} -> {b[key]!r}")
            records = [compared(r) for r in old_by[digest]["records"]], [compared(r) for r in new_by[digest]["records"]]
            if records[0] != records[1]:
                diffs.append(f"{old_by[digest]['label']}: per-item records")
            numbers += len(records[0])
            for name in ("nll", "kv_tokens"):
                if old_by[digest]["curves"].get(name) != new_by[digest]["curves"].get(name):
                    diffs.append(f"{old_by[digest]['label']}: curve {name}")
                numbers += name in old_by[digest]["curves"]
        moved += bool(diffs)
        shown = " ".join(Path(a).name if "/" in a else a for a in args_)
        print(f"{shown:<90} {len(new):>4} {numbers:>7}  {'identical' if not diffs else 'MOVED'}")
        for d in diffs[:10]:
            print(f"    {d}")
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
