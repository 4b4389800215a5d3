"""Passkey retrieval under streaming policies: a number stated early in a long filler text, asked
for at the end, after it has left the recent window. Prints, per policy, the NLL of the passkey's
tokens in the answer and whether the passkey's tokens were in the cache when it was asked.

    python bench/passkey.py [--budget 128] [--filler 24] [--policies streamingllm,longmem]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streambench import models  # noqa: E402
from streambench.config import PolicySpec, build_policy, parse_assignments  # noqa: E402
from streambench.session import StreamSession  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_stream(tokenizer, passkey: str, before: int, after: int):
    """(ids, span of the fact, span of the answer's passkey tokens)."""
    head = FILLER * before
    fact = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    tail = FILLER * after + "What is the pass key? The pass key is"
    ids_head = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids_fact = tokenizer(fact, add_special_tokens=False)["input_ids"]
    ids_tail = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids_key = tokenizer(" " + passkey, add_special_tokens=False)["input_ids"]
    ids = ids_head + ids_fact + ids_tail + ids_key
    fact_span = (len(ids_head), len(ids_head) + len(ids_fact))
    answer_span = (len(ids) - len(ids_key), len(ids))
    return torch.tensor([ids]), fact_span, answer_span


@torch.no_grad()
def run(lm, policy_name: str, args: dict, budget: int, ids, fact_span, answer_span) -> dict:
    policy = build_policy(PolicySpec(policy_name, dict(args)), budget)
    session = StreamSession(lm, policy)
    nll, fact_in_cache = [], None
    for t in range(ids.shape[1] - 1):
        logits = session.feed(ids[:, t : t + 1])[0, -1]
        target = t + 1
        if answer_span[0] <= target < answer_span[1]:
            if fact_in_cache is None:  # the cache the first passkey token is predicted from
                kept = session.cache.positions
                fact_in_cache = int(((kept >= fact_span[0]) & (kept < fact_span[1])).sum())
            nll.append(torch.nn.functional.cross_entropy(logits.float()[None], ids[0, target : target + 1]).item())
    return {"policy": policy_name, "args": policy.args(), "passkey_nll": sum(nll) / len(nll), "passkey_token_nll": nll,
            "fact_tokens_in_cache": fact_in_cache, "fact_tokens": fact_span[1] - fact_span[0],
            "stream_tokens": ids.shape[1], **policy.stats()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--before", type=int, default=4, help="filler repetitions before the fact")
    parser.add_argument("--filler", type=int, default=24, help="filler repetitions after the fact")
    parser.add_argument("--passkey", default="68213")
    parser.add_argument("--policies", default="dense,streamingllm,longmem")
    parser.add_argument("-p", "--policy-arg", action="append", default=[], help="longmem.key=value")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    lm = models.load(device="cpu", dtype="float32")
    ids, fact_span, answer_span = passkey_stream(lm.tokenizer, args.passkey, args.before, args.filler)
    extra = parse_assignments(args.policy_arg, "-p")
    rows = []
    for name in args.policies.split(","):
        own = {k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith(name + ".")}
        rows.append(run(lm, name, own, args.budget, ids, fact_span, answer_span))
        r = rows[-1]
        print(f"{name:<14} passkey NLL {r['passkey_nll']:.3f}  fact tokens in cache {r['fact_tokens_in_cache']}/{r['fact_tokens']}"
              f"  ({r['stream_tokens']} tokens, fact at {fact_span}, budget {args.budget})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
