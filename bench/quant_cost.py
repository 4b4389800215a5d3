"""Per-token cost of a quantized cache over the unquantized one, in one process (ratios only).

Each (policy, bits) stream is fed `--warm` tokens of Hamlet (the cache full at the budget), then
`--tokens` more one at a time, timed; every configuration twice, interleaved, the faster kept (this
machine's speed drifts). Then where the quantized step's extra time goes, for one layer at the
budget: dequantizing keys and values, and rotating the keys at their positions (the price of
holding keys before RoPE), times the model's layer count, as a share of the step.

    python bench/quant_cost.py --budget 256 --tokens 128
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--warm", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--policies", default="dense,streamingllm,h2o")
    parser.add_argument("--bits", default="16,8,4,2")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from streambench.engine.cache.quant import KVQuant, dequantize
    from streambench.engine.session import StreamSession
    from streambench.models import loading
    from streambench.policies.build import PolicySpec, build_policy
    from streambench.tasks.texts import load_text

    lm = loading.load(loading.EMBEDDED, "cpu", "float32")
    total = args.warm + args.tokens
    ids = torch.tensor([lm.tokenizer(load_text()[: 12 * total])["input_ids"][:total]])
    bits_list = [int(b) for b in args.bits.split(",")]
    best: dict = {}
    for _ in range(2):
        for name in args.policies.split(","):
            for bits in bits_list:
                policy = build_policy(PolicySpec(name, {}), None if name == "dense" else args.budget)
                with StreamSession(lm, policy, quant=KVQuant(bits)) as session:
                    for t in range(args.warm):  # (token by token, as a quantized cache feeds)
                        session.feed(ids[:, t : t + 1])
                    t0 = time.perf_counter()
                    for t in range(args.warm, total):
                        session.feed(ids[:, t : t + 1])
                    ms = 1000 * (time.perf_counter() - t0) / args.tokens
                key = (name, bits)
                best[key] = min(best.get(key, ms), ms)
    print(
        f"SmolLM2-135M fp32 on CPU, {torch.get_num_threads()} threads: ms per token after {args.warm} tokens "
        f"(budget {args.budget}; dense holds them all), best of 2"
    )
    print(
        f"{'policy':<14}"
        + "".join(f"{f'{b}-bit':>10}" for b in bits_list)
        + "".join(f"{f'{b}/16':>8}" for b in bits_list[1:])
    )
    for name in args.policies.split(","):
        row = [best[(name, b)] for b in bits_list]
        print(f"{name:<14}" + "".join(f"{v:10.1f}" for v in row) + "".join(f"{v / row[0]:8.2f}x" for v in row[1:]))

    # one layer's reading of a full quantized cache: dequantize, then rotate the keys
    policy = build_policy(PolicySpec("streamingllm", {}), args.budget)
    with StreamSession(lm, policy, quant=KVQuant(4)) as session:
        for t in range(args.warm):
            session.feed(ids[:, t : t + 1])
        cache = session.cache
        shard, n = cache.shards[0], cache._len[0]
        rope = cache.rope

        def timed(fn, reps=200):
            fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            return 1000 * (time.perf_counter() - t0) / reps

        parts = {n_: getattr(shard, n_)[0, :, :, :n] for n_ in ("kq", "ks", "kz", "vq", "vs", "vz")}
        pre = dequantize(parts["kq"], parts["ks"], parts["kz"], 4, cache.dtype)
        deq = timed(
            lambda: (
                dequantize(parts["kq"], parts["ks"], parts["kz"], 4, cache.dtype),
                dequantize(parts["vq"], parts["vs"], parts["vz"], 4, cache.dtype),
            )
        )
        rot = timed(lambda: rope.rotate_each(pre, shard.kpos[0, :, :, :n]))
    layers = cache.num_layers
    step = best[("streamingllm", 4)]
    print(
        f"\nstreamingllm 4-bit, one layer reading {n} held tokens: dequantize K and V {deq:.3f} ms, rotate K "
        f"{rot:.3f} ms; x {layers} layers = {deq * layers:.1f} + {rot * layers:.1f} ms of a {step:.1f} ms step "
        f"({100 * deq * layers / step:.0f}% + {100 * rot * layers / step:.0f}%)"
    )


if __name__ == "__main__":
    main()
