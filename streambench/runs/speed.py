"""`streambench bench`: speed as ratios measured in one process (never absolute numbers in tests).

- bound: bare matrix-vector products over every linear weight of the model (what one decode step
  must read at least), as tokens/s;
- plain: transformers' own decode with a DynamicCache, prefilled to `length` tokens;
- each policy's single-stream decode at the same cache length, over the bound and over plain;
- streamingllm's per-token speedup over recompute-window at several budgets (StreamingLLM reports
  up to 22.2x at 4K on an A6000; the ratio must grow with the budget);
- exact chunked feeding over token-by-token feeding (streambench/engine/exact_chunks.py), per position-only
  policy and budget: the same per-token NLL, this much faster to evaluate.

Each measurement has a burn-in stage and a measured stage, with a synchronize around each on CUDA.
"""

from __future__ import annotations

import functools
import time

import torch

from streambench.policies.build import PolicySpec, build_policy


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, n: int, burn: int, device, repeats: int = 2) -> float:
    """Seconds per call of `step(i)`: the best of `repeats` rounds of n calls, after `burn` untimed
    ones (the minimum is the least disturbed by other work on the machine)."""
    for i in range(burn):
        step(i)
    best = float("inf")
    for r in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for i in range(burn + r * n, burn + (r + 1) * n):
            step(i)
        _sync(device)
        best = min(best, (time.perf_counter() - start) / n)
    return best


@torch.no_grad()
def weight_bound(model, steps: int, burn: int) -> float:
    """Seconds for one pass of mat-vec products over all linear weights (the decode floor)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    device = weights[0].device
    vectors = {w.shape[1]: torch.randn(w.shape[1], dtype=w.dtype, device=device) for w in weights}
    return _timed(lambda i: [torch.mv(w, vectors[w.shape[1]]) for w in weights], steps, burn, device)


@torch.no_grad()
def plain_decode(lm, ids: torch.Tensor, length: int, steps: int, burn: int) -> float:
    from transformers import DynamicCache

    model = lm.model
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :length], cache=cache)
    return _timed(lambda i: model(input_ids=ids[:, length + i : length + i + 1], cache=cache), steps, burn, ids.device)


@torch.no_grad()
def plain_generate(lm, ids: torch.Tensor, length: int, steps: int) -> float:
    """Seconds per new token of `model.generate` (greedy) from a `length`-token prompt: the
    difference between generating steps+1 tokens and 1 token, so the prefill cancels out."""
    model = lm.model
    prompt = ids[:, :length]
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(new: int) -> float:
        _sync(ids.device)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kwargs)
        _sync(ids.device)
        return time.perf_counter() - start

    timed(2)  # warm-up
    return min((timed(steps + 1) - timed(1)) / steps for _ in range(2))


@torch.no_grad()
def policy_decode(
    lm,
    name: str,
    budget: int,
    ids: torch.Tensor,
    length: int,
    steps: int,
    burn: int,
    repeats: int = 2,
    decode: str = "eager",
    device_steps: bool | None = None,
) -> float:
    from streambench.engine.session import StreamSession

    policy = build_policy(PolicySpec(name), budget)
    if policy.recompute or policy.retrieves:
        decode = "eager"  # no static-shape path for these
    with StreamSession(lm, policy, batch_size=ids.shape[0], decode=decode, device_steps=device_steps) as session:
        if session.recomputes:  # its state is just the token window; feeding it would be O(n^2)
            session.prime(ids[:, :length])
        else:
            session.feed(ids[:, :length])
        return _timed(lambda i: session.feed(ids[:, length + i : length + i + 1]), steps, burn, ids.device, repeats)


def random_ids(lm, shape: tuple[int, int], seed: int, device) -> torch.Tensor:
    """Token ids for timing (ordinary ones: no special tokens at the vocabulary's start)."""
    top = min(lm.model.config.vocab_size, 30000)
    return torch.randint(min(100, top // 2), top, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def batched(lm, name: str, budget: int, sizes: list[int], steps: int, burn: int, single_plain: float) -> dict:
    """Aggregate tokens/s of B streams decoded together (policy and plain transformers), against
    one plain stream: batching shares each weight read among B tokens."""
    device = next(lm.model.parameters()).device
    rows = {}
    for size in sizes:
        ids = random_ids(lm, (size, budget + 2 * steps + burn + 2), size, device)
        t = policy_decode(lm, name, budget, ids, budget - 1, steps, burn)
        plain = plain_decode(lm, ids, budget - 1, steps, burn)
        rows[size] = {
            "tokens_per_s": size / t,
            "plain_tokens_per_s": size / plain,
            "over_single_plain": single_plain / t * size,
            "over_plain_same_batch": plain / t,
        }
        if device.type == "cuda":
            g = policy_decode(lm, name, budget, ids, budget - 1, steps, burn, decode="graph")
            rows[size].update({"graph_tokens_per_s": size / g, "graph_over_single_plain": single_plain / g * size})
    return rows


def run_bench(
    lm,
    policies: list[str],
    budget: int,
    budgets: list[int],
    steps: int,
    burn: int,
    batch_sizes: tuple[int, ...] = (1, 4, 8),
    batch_policy: str = "streamingllm",
) -> dict:
    device = next(lm.model.parameters()).device
    need = max([budget, *budgets]) + 2 * steps + burn + 2
    ids = random_ids(lm, (1, need), 0, device)
    plain_decode(lm, ids, budget - 1, steps, burn)  # warm-up: first calls pay for allocations and page faults
    bound = weight_bound(lm.model, steps, burn)
    plain = plain_decode(lm, ids, budget - 1, steps, burn)
    generate = plain_generate(lm, ids, budget - 1, steps)
    rows = {}
    for name in policies:
        t = policy_decode(lm, name, budget, ids, budget - 1, steps, burn)
        rows[name] = {
            "ms_per_token": 1e3 * t,
            "tokens_per_s": 1 / t,
            "of_bound": bound / t,
            "over_plain": plain / t,
            "over_generate": generate / t,
        }
    if device.type == "cuda":  # the same steps replayed as CUDA graphs (streambench run --cuda-graphs)
        from streambench.engine.observe import EAGER_ONLY

        for name, row in rows.items():
            policy = build_policy(PolicySpec(name), budget)
            if policy.observes & EAGER_ONLY or policy.recompute or policy.retrieves:
                continue  # decodes eagerly (the session logs why): no graph row rather than an eager one
            t = policy_decode(lm, name, budget, ids, budget - 1, steps, burn, decode="graph")
            row.update(
                {
                    "graph_ms_per_token": 1e3 * t,
                    "graph_of_bound": bound / t,
                    "graph_over_plain": plain / t,
                    "graph_over_eager": row["ms_per_token"] / (1e3 * t),
                }
            )
    dense = rows.get("dense", {}).get("ms_per_token")
    for row in rows.values():
        row["over_dense_time"] = row["ms_per_token"] / dense if dense else None
    # evictions chosen on the device against the host (engine/cache/device_steps.py): the
    # default is the device on CUDA, the host elsewhere; the other path is timed here
    steps_rows = {}
    for name, row in rows.items():
        if build_policy(PolicySpec(name), budget).device_select:
            on_device = device.type != "cuda"
            other = 1e3 * policy_decode(lm, name, budget, ids, budget - 1, steps, burn, device_steps=on_device)
            host, dev = (row["ms_per_token"], other) if on_device else (other, row["ms_per_token"])
            steps_rows[name] = {"host_ms": host, "device_ms": dev, "device_over_host": dev / host}
    speedups = {}
    for b in budgets:
        sinks = policy_decode(lm, "streamingllm", b, ids, b - 1, steps, burn)
        recompute = policy_decode(lm, "recompute-window", b, ids, b - 1, max(2, steps // 8), 1, repeats=1)
        speedups[b] = {"streamingllm_ms": 1e3 * sinks, "recompute_ms": 1e3 * recompute, "speedup": recompute / sinks}
    return {
        "device": str(device),
        "budget": budget,
        "steps": steps,
        "bound": {"ms_per_token": 1e3 * bound, "tokens_per_s": 1 / bound},
        "plain": {"ms_per_token": 1e3 * plain, "tokens_per_s": 1 / plain, "of_bound": bound / plain},
        "generate": {"ms_per_token": 1e3 * generate, "tokens_per_s": 1 / generate, "of_bound": bound / generate},
        "policies": rows,
        "device_steps": steps_rows,
        "streamingllm_vs_recompute": speedups,
        "batched": {
            "policy": batch_policy,
            "rows": batched(lm, batch_policy, budget, list(batch_sizes), steps, burn, plain),
        }
        if batch_sizes
        else None,
    }


@torch.no_grad()
def grouped_vs_alone(lm, policies: list[str], budget: int, tokens: int) -> dict:
    """Wall time of streaming `tokens` tokens token by token to each policy alone, against all of
    them as one group (one batch, a stream each: engine/session.py `group`), from the same text;
    how far apart the logits are, and which streams' are the same bits as alone."""
    from streambench.engine.session import StreamSession

    device = next(lm.model.parameters()).device
    ids = random_ids(lm, (1, tokens), 3, device)
    alone_s, alone_logits = 0.0, []
    for name in policies:
        with StreamSession(lm, build_policy(PolicySpec(name), budget), max_tokens=tokens) as session:
            _sync(device)
            start = time.perf_counter()
            alone_logits.append(torch.cat([session.feed(ids[:, i : i + 1]) for i in range(tokens)], dim=1))
            _sync(device)
            alone_s += time.perf_counter() - start
    group = [build_policy(PolicySpec(name), budget) for name in policies]
    with StreamSession(lm, group[0], max_tokens=tokens, group=group) as session:
        rows = ids.expand(len(group), -1)
        _sync(device)
        start = time.perf_counter()
        logits = torch.cat([session.feed(rows[:, i : i + 1]) for i in range(tokens)], dim=1)
        _sync(device)
        grouped_s = time.perf_counter() - start
    apart = max(float((logits[b : b + 1] - alone).abs().max()) for b, alone in enumerate(alone_logits))
    same = [
        name for b, (name, alone) in enumerate(zip(policies, alone_logits)) if torch.equal(logits[b : b + 1], alone)
    ]
    return {
        "policies": policies,
        "bit_for_bit": same,  # (the streams whose logits are alone's to the bit: models/few_rows.py)
        "budget": budget,
        "tokens": tokens,
        "alone_s": alone_s,
        "grouped_s": grouped_s,
        "speedup": alone_s / grouped_s,
        "max_abs_logit_diff": apart,
    }


@torch.no_grad()
def tree_vs_branches(lm, policy: str, budget: int, context: int, replies: int, reply_tokens: int, rounds: int) -> dict:
    """Multiple-choice scoring, `replies` candidates of about `reply_tokens` tokens after a
    `context`-token stream: one tree forward (engine/branches.py) against one forward per reply
    and a rollback, seconds per question over `rounds` questions; the log-probs' largest gap."""
    from streambench.engine.session import StreamSession

    device = next(lm.model.parameters()).device
    ids = random_ids(lm, (1, context), 5, device)
    options = [random_ids(lm, (1, reply_tokens + i % 3), 10 + i, device) for i in range(replies)]
    with StreamSession(lm, build_policy(PolicySpec(policy), budget), max_tokens=context + 4 * reply_tokens) as session:
        session.feed(ids, exact=True)
        session.reserve(max(o.shape[1] for o in options))
        why = session.branch_reason()

        def one_by_one(_i: int) -> list:
            state, out = session.checkpoint(), []
            for option in options:
                out.append(session.feed(option))
                session.rollback(state)
            return out

        per_reply = _timed(one_by_one, rounds, 1, device)
        tree = _timed(lambda _i: session.score_branches(options), rounds, 1, device)
        apart = max(float((a - b).abs().max()) for a, b in zip(one_by_one(0), session.score_branches(options)))
    return {
        "policy": policy,
        "budget": budget,
        "context": context,
        "replies": replies,
        "reply_tokens": reply_tokens,
        "per_reply_ms": 1e3 * per_reply,
        "tree_ms": 1e3 * tree,
        "speedup": per_reply / tree,
        "max_abs_logit_diff": apart,
        "tree": why is None,
        **({"why_not": why} if why is not None else {}),
    }


@torch.no_grad()
def dialogue_batched_vs_alone(lm, policy: str, budget: int, episodes: int) -> dict:
    """Wall time of `episodes` grocery episodes (the generated ones, SirLLM's shape) played one
    at a time, against all of them as the ragged streams of one batch (engine/lanes.py); whether
    every item's record came out the same (choice, greedy matches) and the log-probs' largest gap."""
    import copy

    from streambench.engine.meter import Meter
    from streambench.engine.ragged import ragged_refusal
    from streambench.engine.session import StreamSession
    from streambench.tasks.base import NoProgress
    from streambench.tasks.build import build_task

    device = next(lm.model.parameters()).device
    task = build_task("grocery", {"limit": episodes, "seed": 0, "recall_tokens": 8})
    why = ragged_refusal(build_policy(PolicySpec(policy), budget), model=lm.model)
    if why is not None:
        return {"policy": policy, "budget": budget, "episodes": episodes, "why_not": why}

    def play(batch: int):
        first = build_policy(PolicySpec(policy), budget)
        group = [first] + [copy.deepcopy(first) for _ in range(batch - 1)] if batch > 1 else None
        with StreamSession(lm, first, group=group, bitwise=False) as session:  # (as the runner's)
            _sync(device)
            start = time.perf_counter()
            result = task.run(session, lm.tokenizer, Meter(device), NoProgress())
            _sync(device)
            return result.records, time.perf_counter() - start

    alone, alone_s = play(1)
    batched, batched_s = play(episodes)
    same = all(
        (a["chosen"], a["greedy"], a.get("free_answer")) == (b["chosen"], b["greedy"], b.get("free_answer"))
        for a, b in zip(alone, batched)
    )
    apart = max(
        abs(x - y) for a, b in zip(alone, batched) for x, y in zip(a["first_token_logprob"], b["first_token_logprob"])
    )
    return {
        "policy": policy,
        "budget": budget,
        "episodes": episodes,
        "items": len(alone),
        "alone_s": alone_s,
        "batched_s": batched_s,
        "speedup": alone_s / batched_s,
        "records_identical": same and len(alone) == len(batched),
        "max_abs_logprob_diff": apart,
    }


@torch.no_grad()
def exact_vs_token(
    lm,
    budgets: list[int],
    tokens: int,
    steps: int,
    burn: int = 2,
    policies: tuple[str, ...] = ("dense", "window", "streamingllm", "recompute-window"),
) -> list[dict]:
    """Evaluation tokens/s of a `tokens`-token stream fed in exact chunks, over feeding it token by
    token. The exact stream is timed whole. Token by token is timed on `steps` tokens at 1/4, 1/2
    and 3/4 of the stream (state reached by exact chunks, which leave the same cache), and the
    stream's time estimated from their mean (dense's per-token cost grows with its cache; the
    others' is flat once full). recompute-window, O(budget) per token either way, is timed on
    `2 * steps` tokens with a full window: its batched rows against its per-step loop."""
    from streambench.engine.exact_chunks import auto_chunk
    from streambench.engine.session import StreamSession

    device = next(lm.model.parameters()).device
    ids = random_ids(lm, (1, tokens + steps + burn + 2), 11, device)
    rows = []
    for budget in budgets:
        for name in policies:
            if name == "dense" and budget != budgets[0]:
                continue  # no budget: one row
            policy = functools.partial(build_policy, PolicySpec(name), budget)
            chunk = auto_chunk(policy().budget, device, lm.info.num_heads)
            if policy().recompute:
                n = 2 * steps
                with StreamSession(lm, policy()) as session:
                    session.prime(ids[:, : budget - 1])
                    exact = (
                        _timed(
                            lambda i, b=budget, n=n: session.feed(ids[:, b - 1 : b - 1 + n], exact=True),
                            1,
                            0,
                            device,
                            1,
                        )
                        / n
                    )
                with StreamSession(lm, policy()) as session:
                    session.prime(ids[:, : budget - 1])
                    token = _timed(lambda i, b=budget: session.feed(ids[:, b - 1 + i : b + i]), steps, burn, device, 1)
                rows.append(
                    {
                        "policy": name,
                        "budget": budget,
                        "tokens": n,
                        "chunk": n,
                        "exact_tokens_per_s": 1 / exact,
                        "token_tokens_per_s": 1 / token,
                        "speedup": token / exact,
                    }
                )
                continue
            with StreamSession(lm, policy()) as session:
                session.feed(ids[:, :chunk], exact=True)  # warm-up
            with StreamSession(lm, policy()) as session:
                _sync(device)
                start = time.perf_counter()
                for i in range(0, tokens, chunk):
                    session.feed(ids[:, i : min(i + chunk, tokens)], exact=True)
                _sync(device)
                exact = (time.perf_counter() - start) / tokens
            per_token = []
            for fraction in (0.25, 0.5, 0.75):
                at = int(tokens * fraction)
                with StreamSession(lm, policy()) as session:
                    for i in range(0, at, chunk):
                        session.feed(ids[:, i : min(i + chunk, at)], exact=True)
                    per_token.append(
                        _timed(lambda i, at=at: session.feed(ids[:, at + i : at + i + 1]), steps, burn, device, 1)
                    )
            token = sum(per_token) / len(per_token)
            rows.append(
                {
                    "policy": name,
                    "budget": policy().budget,
                    "tokens": tokens,
                    "chunk": chunk,
                    "exact_tokens_per_s": 1 / exact,
                    "token_tokens_per_s": 1 / token,
                    "speedup": token / exact,
                }
            )
    return rows


@torch.no_grad()
def soak(lm, tokens: int, budget: int, chunk: int, on_chunk=None) -> dict:
    """Stream `tokens` tokens under streamingllm in chunks; record the KV bytes and process RSS
    along the way. Memory must be flat: KV bytes constant once full, RSS growth small between the
    10% mark and the end (a leak of even a few bytes per token shows over a million tokens)."""
    import psutil

    from streambench.engine.session import StreamSession

    device = next(lm.model.parameters()).device
    session = StreamSession(lm, build_policy(PolicySpec("streamingllm"), budget))
    chunk = min(chunk, session.policy.max_incoming)
    process = psutil.Process()
    marks, kv, allocated = [], set(), set()
    mark_every = max(tokens // 20, chunk)
    fed, next_mark, rss_10 = 0, mark_every, None
    _sync(device)
    start = time.perf_counter()
    while fed < tokens:
        n = min(chunk, tokens - fed)
        ids = random_ids(lm, (1, n), fed, device)
        session.feed(ids)
        fed += n
        if fed > budget:
            kv.add(session.kv_bytes)
            allocated.add(session.allocated_kv_bytes)
        if fed >= next_mark or fed == tokens:
            _sync(device)
            rss = process.memory_info().rss
            marks.append(
                {
                    "tokens": fed,
                    "rss_mib": rss / 2**20,
                    "kv_bytes": session.kv_bytes,
                    "seconds": time.perf_counter() - start,
                }
            )
            if rss_10 is None and fed >= tokens // 10:
                rss_10 = rss
            next_mark += mark_every
            if on_chunk:
                on_chunk(marks[-1])
    seconds = time.perf_counter() - start
    rss_end = process.memory_info().rss
    return {
        "tokens": fed,
        "budget": budget,
        "chunk": chunk,
        "seconds": seconds,
        "tokens_per_s": fed / seconds,
        "kv_bytes_values": sorted(kv),
        "allocated_kv_bytes_values": sorted(allocated),
        "kv_constant": len(kv) == 1 and len(allocated) == 1,
        "rss_10pct_mib": rss_10 / 2**20,
        "rss_end_mib": rss_end / 2**20,
        "rss_growth": rss_end / rss_10 - 1,
        "marks": marks,
    }


def format_bench(out: dict, model: str, dtype: str) -> str:
    """The bench's tables, as `streambench bench` and bench/gpu_bench.py print them."""
    from tabulate import tabulate

    budget = out["budget"]
    lines = [
        f"{model} on {out['device']} ({dtype}), cache {budget}, {out['steps']} measured steps",
        f"bare weight-streaming bound: {out['bound']['ms_per_token']:.2f} ms/token "
        f"({out['bound']['tokens_per_s']:.1f} tokens/s); plain transformers decode: "
        f"{out['plain']['ms_per_token']:.2f} ms/token ({out['plain']['of_bound']:.2f} of the bound); "
        f"model.generate: {out['generate']['ms_per_token']:.2f} ms/token",
        "",
    ]
    rows = [
        [
            n,
            r["ms_per_token"],
            r["tokens_per_s"],
            r["of_bound"],
            r["over_plain"],
            r["over_generate"],
            r["over_dense_time"],
        ]
        for n, r in out["policies"].items()
    ]
    if rows:
        lines.append(
            tabulate(
                rows,
                headers=[
                    "policy",
                    "ms/token",
                    "tokens/s",
                    "of bound",
                    "speed over plain",
                    "speed over generate",
                    "time over dense",
                ],
                floatfmt=".2f",
            )
        )
    graphed = {n: r for n, r in out["policies"].items() if "graph_ms_per_token" in r}
    if graphed:
        rows = [
            [
                n,
                r["graph_ms_per_token"],
                1e3 / r["graph_ms_per_token"],
                r["graph_of_bound"],
                r["graph_over_plain"],
                r["graph_over_eager"],
            ]
            for n, r in graphed.items()
        ]
        lines += [
            "",
            "with CUDA graphs (--cuda-graphs):",
            tabulate(
                rows,
                headers=["policy", "ms/token", "tokens/s", "of bound", "speed over plain", "speed over eager"],
                floatfmt=".2f",
            ),
        ]
    if out.get("device_steps"):
        default = "the device" if out["device"].startswith("cuda") else "the host"
        rows = [[n, r["host_ms"], r["device_ms"], r["device_over_host"]] for n, r in out["device_steps"].items()]
        lines += [
            "",
            f"evictions chosen on the host and on the device (ms/token; the default here: {default}):",
            tabulate(rows, headers=["policy", "host", "device", "device over host"], floatfmt=".2f"),
        ]
    if out["streamingllm_vs_recompute"]:
        rows = [
            [b, r["streamingllm_ms"], r["recompute_ms"], r["speedup"]]
            for b, r in out["streamingllm_vs_recompute"].items()
        ]
        lines += [
            "",
            tabulate(rows, headers=["budget", "streamingllm ms", "recompute-window ms", "speedup"], floatfmt=".2f"),
        ]
    if out.get("exact"):
        rows = [
            [
                r["policy"],
                r["budget"] if r["budget"] is not None else "all",
                r["tokens"],
                r["chunk"],
                r["token_tokens_per_s"],
                r["exact_tokens_per_s"],
                r["speedup"],
            ]
            for r in out["exact"]
        ]
        lines += [
            "",
            "exact chunked feeding vs token by token (same per-token NLL; evaluation tokens/s):",
            tabulate(
                rows,
                headers=[
                    "policy",
                    "budget",
                    "tokens",
                    "chunk",
                    "token-by-token tok/s",
                    "exact chunked tok/s",
                    "speedup",
                ],
                floatfmt=".2f",
            ),
        ]
    if out.get("grouped"):
        g = out["grouped"]
        lines += [
            "",
            f"one stream to {len(g['policies'])} policies ({', '.join(g['policies'])}; cache {g['budget']}, "
            f"{g['tokens']} tokens, token by token):",
            tabulate(
                [
                    [
                        g["alone_s"],
                        g["grouped_s"],
                        g["speedup"],
                        g["max_abs_logit_diff"],
                        f"{len(g['bit_for_bit'])}/{len(g['policies'])}",
                    ]
                ],
                headers=["one at a time s", "one group s", "speedup", "max |logit diff|", "bit for bit"],
                floatfmt=(".2f", ".2f", ".2f", ".1e"),
            ),
        ]
    if out.get("dialogue"):
        d = out["dialogue"]
        head = f"dialogue batched ({d['episodes']} grocery episodes, {d['policy']}, cache {d['budget']}"
        if "why_not" in d:
            lines += ["", f"{head}): runs one at a time ({d['why_not']})"]
        else:
            lines += [
                "",
                f"{head}, {d['items']} questions; one ragged batch against one episode at a time):",
                tabulate(
                    [
                        [
                            d["alone_s"],
                            d["batched_s"],
                            d["speedup"],
                            "yes" if d["records_identical"] else "NO",
                            d["max_abs_logprob_diff"],
                        ]
                    ],
                    headers=["one at a time s", "batched s", "speedup", "same choices", "max |logprob diff|"],
                    floatfmt=(".2f", ".2f", ".2f", "", ".1e"),
                ),
            ]
    if out.get("replies"):
        r = out["replies"]
        how = "one tree forward" if r["tree"] else f"no tree here ({r['why_not']})"
        lines += [
            "",
            f"reply scoring ({r['policy']}, cache {r['budget']}, {r['replies']} replies of ~{r['reply_tokens']} "
            f"tokens after {r['context']}; {how}):",
            tabulate(
                [[r["per_reply_ms"], r["tree_ms"], r["speedup"], r["max_abs_logit_diff"]]],
                headers=["one forward per reply ms", "tree ms", "speedup", "max |logit diff|"],
                floatfmt=(".2f", ".2f", ".2f", ".1e"),
            ),
        ]
    if out["batched"]:
        rows = [
            [
                b,
                r["tokens_per_s"],
                r["plain_tokens_per_s"],
                r["over_single_plain"],
                r["over_plain_same_batch"],
                *([r["graph_tokens_per_s"], r["graph_over_single_plain"]] if "graph_tokens_per_s" in r else []),
            ]
            for b, r in out["batched"]["rows"].items()
        ]
        headers = ["batch", "tokens/s (all streams)", "plain tokens/s", "over single plain", "over plain same batch"]
        if len(rows[0]) > len(headers):
            headers += ["graph tokens/s", "graph over single plain"]
        lines += [
            "",
            f"batched streams ({out['batched']['policy']}, cache {budget}):",
            tabulate(rows, headers=headers, floatfmt=".2f"),
        ]
    return "\n".join(lines)
