"""The two layouts of a linear layer's product for a few rows, on the embedded model's weights:
x @ W^T (`F.linear`, nn.Linear's own) against W @ x^T (models/few_rows.py, what a batched
session's forwards take from 2 to MAX_ROWS rows). Interleaved, best of `--reps`; prints ms per
pass over all the model's linear weights and the ratio.

    python bench/few_rows_linear.py [--reps 12] [--rows 1,2,3,4,5,8,16,32,38,114]

About a minute on 2 CPU cores."""

from __future__ import annotations

import argparse
import time

import torch

from streambench.models import loading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--rows", default="1,2,3,4,5,8,16,32,38,114")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    lm = loading.load(args.model, "cpu")
    weights = [m.weight.detach() for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    layouts = {
        "x @ W^T (F.linear)": lambda x, w: torch.nn.functional.linear(x, w),
        "W @ x^T (few rows)": lambda x, w: torch.mm(w, x.t()).t().contiguous(),
    }
    inputs = {(n, w.shape[1]): torch.randn(n, w.shape[1]) for n in rows for w in weights}
    best = {(name, n): float("inf") for name in layouts for n in rows}
    with torch.no_grad():
        for _ in range(args.reps):
            for n in rows:
                for name, product in layouts.items():
                    started = time.perf_counter()
                    for w in weights:
                        product(inputs[n, w.shape[1]], w)
                    best[name, n] = min(best[name, n], time.perf_counter() - started)
    print(
        f"{len(weights)} linear weights of {args.model}, ms per pass (best of {args.reps}), torch {torch.__version__}"
    )
    print("| rows | " + " | ".join(layouts) + " | ratio | batch cost vs 1 row (few rows) |")
    print("|---|---|---|---|---|")
    single = best["x @ W^T (F.linear)", rows[0]]
    for n in rows:
        a, b = (best[name, n] * 1000 for name in layouts)
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f} | {b / 1000 / single:.2f} |")


if __name__ == "__main__":
    main()
