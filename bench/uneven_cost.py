"""What unequal budgets cost per token against snapkv, the uniform policy they build on.

Streams `--tokens` Hamlet tokens at `--budget` on the embedded model (the first `budget` in one
chunk, then token by token) under snapkv and each uneven policy, in one process, one after the
other (CPU: 2 threads), and prints decode tokens/s over the evicting part, PPL, the logical and
physical KV bytes at the end, and the cost per token over snapkv.

    python bench/uneven_cost.py --tokens 1024 --budget 128
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from streambench.engine.session import StreamSession
from streambench.models import loading as models
from streambench.policies.build import PolicySpec, build_policy
from streambench.tasks.texts import DEFAULT_TEXT, load_text

POLICIES = [
    ("snapkv", {}),
    ("pyramidkv", {}),
    ("adakv", {}),
    ("duo", {}),
    ("kvpress:PyramidKVPress", {"window_size": 32}),
    ("kvpress:AdaKVPress", {"press": "SnapKVPress(window_size=32)"}),
]


def rate(lm, name, args, budget, ids) -> tuple[float, float, int, int]:
    """(tokens/s over the evicting part, PPL over the stream, logical and physical KV bytes)."""
    with StreamSession(lm, build_policy(PolicySpec(name, dict(args)), budget)) as session:
        logits = session.feed(ids[:, :budget])[0]
        nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1 : budget + 1], reduction="none").tolist()
        start = time.perf_counter()
        for t in range(budget, ids.shape[1] - 1):
            logits = session.feed(ids[:, t : t + 1])[0, -1]
            nll.append(torch.nn.functional.cross_entropy(logits.float()[None], ids[0, t + 1 : t + 2]).item())
        seconds = time.perf_counter() - start
        return (
            (ids.shape[1] - 1 - budget) / seconds,
            float(torch.tensor(nll).mean().exp()),
            session.kv_bytes,
            session.physical_kv_bytes,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--no-kvpress", action="store_true", help="leave out the kvpress wrappers")
    args = parser.parse_args()
    lm = models.load(models.EMBEDDED, device="cpu", dtype="float32")
    ids = torch.tensor([lm.tokenizer(load_text(DEFAULT_TEXT))["input_ids"][: args.tokens]])
    rate(lm, "window", {}, args.budget, ids[:, : args.budget + 8])  # warm-up
    print(f"{'policy':<26}{'tok/s':>8}{'PPL':>9}{'KV MiB':>9}{'physical':>10}{'cost':>7}")
    base = None
    for name, policy_args in POLICIES:
        if args.no_kvpress and name.startswith("kvpress:"):
            continue
        r, ppl, logical, physical = rate(lm, name, policy_args, args.budget, ids)
        base = base or r
        print(f"{name:<26}{r:>8.1f}{ppl:>9.2f}{logical / 2**20:>9.2f}{physical / 2**20:>10.2f}{base / r:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
