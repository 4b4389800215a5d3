"""Reply scoring in one tree forward against one forward per reply, on a dialogue task end to end:
the same task run twice in one process (trees off: `branch_reason` says so), wall time and
whether every record (choice, greedy flags, first-token log-probs, KV tokens) is the same.

    python bench/reply_scoring.py [--task grocery] [--limit 10] [--policy streamingllm,sirllm] [--budget 512]
"""

from __future__ import annotations

import argparse
import time

from streambench.engine.meter import Meter
from streambench.engine.session import StreamSession
from streambench.models import loading
from streambench.policies.build import PolicySpec, build_policy
from streambench.tasks.base import NoProgress
from streambench.tasks.build import build_task


def run(lm, task_name: str, limit: int, policy: str, budget: int, tree: bool) -> tuple[float, list, dict]:
    original = StreamSession.branch_reason
    if not tree:
        StreamSession.branch_reason = lambda self: "trees off (bench)"  # type: ignore[method-assign]
    try:
        task = build_task(task_name, {"limit": limit})
        with StreamSession(lm, build_policy(PolicySpec(policy), budget)) as session:
            started = time.perf_counter()
            result = task.run(session, lm.tokenizer, Meter(session.device), NoProgress())
            return time.perf_counter() - started, result.records, result.metrics
    finally:
        StreamSession.branch_reason = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="grocery")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--policy", default="streamingllm,sirllm")
    parser.add_argument("--budget", type=int, default=512)
    args = parser.parse_args()
    lm = loading.load("smollm2-135m", "cpu")
    keys = ("chosen", "greedy", "first_token_logprob", "kv_tokens")
    print(f"| policy | {args.task} items | one forward per reply s | tree s | speedup | same records |")
    print("|---|---|---|---|---|---|")
    for policy in [p.strip() for p in args.policy.split(",") if p.strip()]:
        plain_s, plain, _ = run(lm, args.task, args.limit, policy, args.budget, tree=False)
        tree_s, trees, _ = run(lm, args.task, args.limit, policy, args.budget, tree=True)
        same = len(plain) == len(trees) and all(all(a[k] == b[k] for k in keys) for a, b in zip(plain, trees))
        print(f"| {policy} | {len(trees)} | {plain_s:.1f} | {tree_s:.1f} | {plain_s / tree_s:.2f}x | {same} |")


if __name__ == "__main__":
    main()
