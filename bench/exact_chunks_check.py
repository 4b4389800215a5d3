"""Exact chunks against token-by-token feeding on the embedded model, at full size.

The suite checks this on 256 Hamlet tokens at budget 64 (tests/engine/test_exact_chunks.py);
this is the same check at the size a user runs: per-token NLL of whole-chunk feeding (the
default `--feed exact`) against one token per forward, for dense, window and streamingllm over
`--tokens` tokens at `--budget`, and recompute-window over its first `--recompute-tokens`.

    python bench/exact_chunks_check.py                      # 2,048 tokens at budget 256 (~12 CPU minutes)
    python bench/exact_chunks_check.py --tokens 1024 --device cuda

Prints one row per policy (PPL both ways, their relative difference, the largest per-token NLL
difference) and exits 1 when PPL differs by more than 1e-5 relative or a token's NLL by more
than 1e-3 + 1e-4 of it (fp32 rounding; window's NLL runs to ~20 without its sinks).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from streambench.engine.session import StreamSession
from streambench.models import loading as models
from streambench.policies.build import PolicySpec, build_policy
from streambench.tasks.texts import DEFAULT_TEXT, load_text


def nll(lm, name: str, budget: int, ids: torch.Tensor, chunk: int, exact: bool) -> torch.Tensor:
    with StreamSession(lm, build_policy(PolicySpec(name), budget)) as session:
        n = ids.shape[1] - 1
        logits = torch.cat([session.feed(ids[:, i : min(i + chunk, n)], exact=exact) for i in range(0, n, chunk)], 1)
    return F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none").double()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--recompute-tokens", type=int, default=280)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    lm = models.load(models.EMBEDDED, device=args.device, dtype="float32")
    text = lm.tokenizer(load_text(DEFAULT_TEXT))["input_ids"][: args.tokens]
    ids = torch.tensor([text], device=next(lm.model.parameters()).device)
    failed = False
    print(
        f"{'policy':<18}{'tokens':>7}{'PPL exact chunks':>18}{'PPL token by token':>20}{'rel diff':>10}{'max |dNLL|':>12}"
    )
    for name in ("dense", "window", "streamingllm", "recompute-window"):
        stream = ids[:, : args.recompute_tokens + 1] if name == "recompute-window" else ids
        chunk = args.budget // 2 if name == "recompute-window" else args.budget
        got = nll(lm, name, args.budget, stream, chunk, exact=True)
        want = nll(lm, name, args.budget, stream, 1, exact=False)
        ppl_got, ppl_want = got.mean().exp().item(), want.mean().exp().item()
        rel, worst = abs(ppl_got - ppl_want) / ppl_want, (got - want).abs().max().item()
        failed |= rel > 1e-5 or bool(((got - want).abs() > 1e-3 + 1e-4 * want.abs()).any())
        print(f"{name:<18}{stream.shape[1]:>7}{ppl_got:>18.4f}{ppl_want:>20.4f}{rel:>10.1e}{worst:>12.1e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
