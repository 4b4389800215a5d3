"""Issue 29's done-when: a sweep of the eight policies over 2,048 tokens of Hamlet at budget 256,
grouped (the content-aware runs as one batch) and one at a time, in one process on one machine;
prints wall times, the ratio, and how far apart each run's per-token NLL is.

    python bench/group_sweep.py [--tokens 2048] [--budget 256] [--policies dense,window,...]

About 25-35 minutes on 2 CPU cores (one at a time ~17-21, grouped ~9-12)."""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from streambench.models import loading
from streambench.policies.build import PolicySpec
from streambench.runs import runner
from streambench.runs.config import RunConfig

POLICIES = "dense,window,streamingllm,sirllm,h2o,tova,knorm,snapkv"


def sweep(lm, names: list[str], tokens: int, budget: int, group: bool, out: str) -> tuple[float, dict, list[str]]:
    config = RunConfig(
        policies=[PolicySpec(n, {}) for n in names],
        budget=budget,
        task_args={"tokens": tokens},
        out=out,
        group=group,
        device="cpu",
    )
    made = runner.plan(config)
    started = time.perf_counter()
    results = {r["label"]: r for r in runner.run(config, lm=lm, planned=made)}
    return time.perf_counter() - started, results, made.grouping()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--policies", default=POLICIES)
    args = parser.parse_args()
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    lm = loading.load("smollm2-135m", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        apart_s, apart, _ = sweep(lm, names, args.tokens, args.budget, False, f"{tmp}/apart")
        together_s, together, plan = sweep(lm, names, args.tokens, args.budget, True, f"{tmp}/together")
    print("\n".join(plan))
    print(f"\none at a time: {apart_s:.1f} s   grouped: {together_s:.1f} s   ratio {apart_s / together_s:.2f}x\n")
    print("| policy | PPL alone | PPL grouped | max abs dNLL | tok/s alone | tok/s grouped (per stream) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        a, b = apart[name], together[name]
        d = np.abs(np.subtract(a["curves"]["nll"]["value"], b["curves"]["nll"]["value"])).max()
        print(
            f"| {name} | {a['metrics']['ppl']:.4f} | {b['metrics']['ppl']:.4f} | {d:.1e} | "
            f"{a['metrics']['tokens_per_s']:.1f} | {b['metrics']['tokens_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
