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

import torch
from kvpress_bridge import stream  # (bench/: the same measurement as the bridge's cost)

from streambench.models import loading as models
from streambench.tasks.texts import DEFAULT_TEXT, load_text

POLICIES = [
    ("snapkv", {}),
    ("pyramidkv", {}),
    ("adakv", {}),
    ("duo", {}),
    ("kvpress:PyramidKVPress", {"window_size": 32}),
    ("kvpress:AdaKVPress", {"press": "SnapKVPress(window_size=32)"}),
    ("kvpress:CriticalAdaKVPress", {"press": "SnapKVPress(window_size=32)"}),
    ("kvpress:PerLayerCompressionPress", {"press": "SnapKVPress(window_size=32)", "compression_ratios": "pyramid"}),
]


def layer_ratios(layers: int) -> list[float]:
    """A PerLayerCompressionPress schedule for the bench: ratios rising from 0.2 at the bottom
    layer to 0.8 at the top (each layer's share of the budget falls linearly)."""
    return [0.2 + 0.6 * i / max(layers - 1, 1) for i in range(layers)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--no-kvpress", action="store_true", help="leave out the kvpress wrappers")
    args = parser.parse_args()
    lm = models.load(models.EMBEDDED, device="cpu", dtype="float32")
    ids = torch.tensor([lm.tokenizer(load_text(DEFAULT_TEXT))["input_ids"][: args.tokens]])
    stream(lm, "window", {}, args.budget, ids[:, : args.budget + 8])  # warm-up
    print(f"{'policy':<26}{'tok/s':>8}{'PPL':>9}{'KV MiB':>9}{'physical':>10}{'cost':>7}")
    base = None
    for name, policy_args in POLICIES:
        if args.no_kvpress and name.startswith("kvpress:"):
            continue
        if policy_args.get("compression_ratios") == "pyramid":
            policy_args = {**policy_args, "compression_ratios": layer_ratios(lm.model.config.num_hidden_layers)}
        m = stream(lm, name, policy_args, args.budget, ids)
        r, logical, physical = m["rate"], m["kv_bytes"] / 2**20, m["physical_kv_bytes"] / 2**20
        base = base or r
        print(f"{name:<26}{r:>8.1f}{m['ppl']:>9.2f}{logical:>9.2f}{physical:>10.2f}{base / r:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
