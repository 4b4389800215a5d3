"""What the kvpress bridge costs per token against the native policy where both exist.

Streams `--tokens` Hamlet tokens at `--budget` (the first `budget` in one chunk, then token by token) on the embedded model under each
pair (native policy, the press that defines the same keep-set) and prints decode tokens/s of
both and their ratio, measured in one process, one after the other (CPU: 2 threads).

    python bench/kvpress_bridge.py --tokens 384 --budget 64
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

PAIRS = [
    (("knorm", {"start_size": 0}), ("kvpress:KnormPress", {})),
    (("streamingllm", {"start_size": 4}), ("kvpress:StreamingLLMPress", {"n_sink": 4})),
    (("snapkv", {"window": 16, "kernel": 5, "interval": 1}), ("kvpress:SnapKVPress", {"window_size": 16})),
    (("tova", {}), ("kvpress:TOVAPress", {})),
    (("random", {}), ("kvpress:RandomPress", {"seed": 0})),
]


def stream(lm, name, args, budget, ids) -> dict:
    """One stream under a policy: tokens/s over its evicting part (the first `budget` tokens, which
    evict nothing, go in one chunk: the engine's chunks are exact), PPL over all of it, and the
    logical and physical KV bytes it ends with."""
    with StreamSession(lm, build_policy(PolicySpec(name, dict(args)), budget)) as session:
        logits = session.feed(ids[:, :budget])[0]
        nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1 : budget + 1], reduction="none").tolist()
        start = time.perf_counter()
        for t in range(budget, ids.shape[1] - 1):
            logits = session.feed(ids[:, t : t + 1])[0, -1]
            nll.append(torch.nn.functional.cross_entropy(logits.float()[None], ids[0, t + 1 : t + 2]).item())
        seconds = time.perf_counter() - start
        return {
            "rate": (ids.shape[1] - 1 - budget) / seconds,
            "ppl": float(torch.tensor(nll).mean().exp()),
            "kv_bytes": session.kv_bytes,
            "physical_kv_bytes": session.physical_kv_bytes,
        }


def rate(lm, name, args, budget, ids) -> tuple[float, float]:
    """(tokens/s over the evicting part of the stream, PPL over all of it)."""
    measured = stream(lm, name, args, budget, ids)
    return measured["rate"], measured["ppl"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=384)
    parser.add_argument("--budget", type=int, default=64)
    args = parser.parse_args()
    lm = models.load(models.EMBEDDED, device="cpu", dtype="float32")
    ids = torch.tensor([lm.tokenizer(load_text(DEFAULT_TEXT))["input_ids"][: args.tokens]])
    rate(lm, "window", {}, args.budget, ids[:, : args.budget + 8])  # warm-up
    print(f"{'native':<14}{'tok/s':>8}{'PPL':>9}   {'press':<28}{'tok/s':>8}{'PPL':>9}{'cost':>7}")
    for (native, native_args), (press, press_args) in PAIRS:
        r1, p1 = rate(lm, native, native_args, args.budget, ids)
        r2, p2 = rate(lm, press, press_args, args.budget, ids)
        print(f"{native:<14}{r1:>8.1f}{p1:>9.2f}   {press:<28}{r2:>8.1f}{p2:>9.2f}{r1 / r2:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
