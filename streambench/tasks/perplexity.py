"""Streaming perplexity: stream a long text, score each next token under the cache.

The protocol is mit-han-lab/streaming-llm `examples/eval_long_ppl.py`: the token at position t
is fed, the logits it produces score token t+1, the policy evicts between steps. `feed` says how:

- `exact` (default): the protocol's numbers, token-exact. Position-only policies (dense, window,
  streamingllm, recompute-window) are fed `chunk_size` tokens per forward with per-query masks
  (streambench/engine/exact_chunks.py), ~10-25x faster on CPU; content-aware ones go token by token.
- `token`: one token per forward for every policy (the protocol literally).
- `approximate`: `chunk_size` tokens per forward, evicting between chunks (tokens early in a chunk
  see fewer than `budget` keys). Fast for every policy, not token-exact.

With chunks, tokens/s is evaluation throughput; the policy's per-token decode speed is measured
by a short token-by-token probe after the stream (`decode_tokens_per_s`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streambench.errors import DataError
from streambench.tasks import register_task
from streambench.tasks.base import Task, TaskResult
from streambench.tasks.texts import DEFAULT_TEXT, check_source, load_text

FULL_CURVE_LIMIT = 8192  # longer streams store the NLL curve as bin means
FEEDS = ("exact", "token", "approximate")


@register_task("perplexity", "ppl")
@dataclass
class PerplexityTask(Task):
    """Perplexity of a long text streamed through the policy (StreamingLLM, Fig. 3).

    `text` may name several texts, comma-separated (e.g. three PG19 books): each is its own stream
    of `tokens` tokens, and PPL is over all their predictions. With `--batch-size B` the streams
    run B at a time in one batch; the numbers are the same as one by one, only faster."""

    version = 1
    summary = "streaming perplexity of a long text (token-exact, in chunks where the policy allows)"
    higher_is_better = {"ppl": False, "ppl_last_half": False, "nll_mean": False}
    columns = (("tokens", "tokens"), ("PPL", "ppl"), ("PPL last half", "ppl_last_half"))
    quality = "ppl"
    default_budget = 64  # with 768 tokens: the papers' effect in a few CPU minutes
    run_defaults = {"tokens": 768}  # the default run: all six policies in ~3 CPU minutes
    batchable = True

    text: str = DEFAULT_TEXT
    tokens: int = 2048
    feed: str = "exact"
    chunk_size: int | None = None  # tokens per forward; None: chosen from the budget (exact.auto_chunk)
    decode_probe: int = 16  # tokens fed one at a time after a chunked stream, for decode speed
    split: str = "test"
    field: str = "text"
    index: int = 0

    def configure(self) -> None:
        self._require(
            isinstance(self.tokens, int) and self.tokens >= 2, f"tokens must be an integer >= 2, got {self.tokens!r}"
        )
        check_feeding(self)
        self._require(
            isinstance(self.decode_probe, int) and not isinstance(self.decode_probe, bool) and self.decode_probe >= 0,
            f"decode_probe must be an integer >= 0, got {self.decode_probe!r}",
        )
        self._require(
            isinstance(self.text, str) and self.sources, f"text must name at least one text, got {self.text!r}"
        )
        for source in self.sources:
            check_source(source)  # a missing file fails now, not after the model has loaded

    def stream_tokens(self) -> int:
        return self.tokens

    def context_tokens(self) -> int:
        return self.tokens

    @property
    def sources(self) -> list[str]:
        return [s.strip() for s in str(self.text).split(",") if s.strip()]

    def token_ids(self, tokenizer, source: str | None = None) -> list[int]:
        source = source or self.sources[0]
        text = load_text(source, self.split, self.field, self.index)
        ids = tokenizer(text)["input_ids"]
        if len(ids) < self.tokens:
            raise DataError(f"text {source} has {len(ids)} tokens, fewer than the {self.tokens} requested")
        return ids[: self.tokens]

    def feeding(self, session) -> dict:
        return feeding(session, self.feed, self.chunk_size)

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        import torch

        sources = self.sources
        ids = torch.tensor([self.token_ids(tokenizer, s) for s in sources], device=session.device)
        n_streams = ids.shape[0]
        feeding = self.feeding(session)
        batch = min(session.batch, n_streams)
        progress.total(n_streams * (ids.shape[1] - 1), "tok")
        meter.start(session)
        nll, rows = self._stream(session, ids, batch, feeding, meter, progress)
        decode = meter.rate() if feeding["mode"] == "token" else self._probe(session, rows, meter)
        values = nll.double().cpu()
        info = self._info(ids, feeding)
        if n_streams > 1:
            info["streams"] = n_streams
            info["batch_size"] = batch
            info["per_text"] = [{"text": s, "ppl": math.exp(values[i].mean().item())} for i, s in enumerate(sources)]
        return self._result(values, decode, info)

    def group_refusal(self) -> str | None:
        if len(self.sources) > 1:
            return "several texts batch by --batch-size"
        if self.feed == "approximate":
            return "approximate chunks evict between chunks, each run its own way"
        return None

    def feeds_exact_chunks(self, policy) -> bool:
        return self.feed == "exact" and policy.band is not None and not policy.observes and not policy.retrieves

    def run_group(self, session, tokenizer, meter, progress) -> list[TaskResult]:
        """One text fed to every stream of the group token by token (each policy would alone:
        runs/grouping.py groups no policy that feeds exact chunks); one result per policy."""
        import torch

        from streambench.engine.session import token_by_token_reason

        ids = torch.tensor([self.token_ids(tokenizer)], device=session.device).expand(session.batch, -1)
        progress.total(session.batch * (ids.shape[1] - 1), "tok")
        feeding = {"mode": "token", "chunk": 1, "token_exact": True}
        meter.start(session)
        nll, _ = self._stream(session, ids, session.batch, feeding, meter, progress)
        values = nll.double().cpu()
        results = []
        for b, policy in enumerate(session.group):
            own = {**feeding}
            if self.feed != "token":
                own["why_token"] = token_by_token_reason(policy)
            results.append(self._result(values[b : b + 1], meter.rate(b), self._info(ids[:1], own)))
        return results

    def _stream(self, session, ids, batch, feeding, meter, progress):
        """Feed the rows of `ids`, `batch` at a time; (NLL per prediction (rows, n - 1), the last rows fed)."""
        import torch
        import torch.nn.functional as F

        n_streams, n_pred = ids.shape[0], ids.shape[1] - 1
        nll = torch.empty(n_streams, n_pred, dtype=torch.float32, device=session.device)
        step = feeding["chunk"]
        exact = feeding["mode"] == "exact-chunks"
        rows = ids
        for first in range(0, n_streams, batch):
            rows = ids[first : first + batch]
            width = rows.shape[0]
            session.set_batch(width)  # each group of streams starts afresh
            for start in range(0, n_pred, step):
                end = min(start + step, n_pred)
                logits = session.feed(rows[:, start:end], exact=exact)
                nll[first : first + width, start:end] = F.cross_entropy(
                    logits.float().transpose(1, 2), rows[:, start + 1 : end + 1], reduction="none"
                )
                meter.step(width * (end - start))
                progress(width * (end - start))
        return nll, rows

    def _info(self, ids, feeding: dict) -> dict:
        from streambench.tasks.texts import REPLACED

        info = {
            "text": self.text,
            "tokens_streamed": ids.shape[1],
            "predictions": (ids.shape[1] - 1) * ids.shape[0],
            "token_exact": feeding["token_exact"],
            "feeding": feeding,
        }
        replaced = {s: REPLACED[s] for s in self.sources if s in REPLACED}
        if replaced:
            info["undecodable_replaced"] = replaced  # bytes that were not UTF-8, read as U+FFFD
        return info

    def _result(self, values, decode: float | None, info: dict) -> TaskResult:
        """Metrics and curve from per-prediction NLLs (streams, n - 1)."""
        n_pred = values.shape[1]
        half = values[:, n_pred // 2 :]
        metrics = {
            "ppl": math.exp(values.mean().item()),
            "ppl_last_half": math.exp(half.mean().item()),
            "nll_mean": values.mean().item(),
        }
        if decode is not None:
            metrics["decode_tokens_per_s"] = decode
        return TaskResult(metrics=metrics, curves={"nll": nll_curve(values.mean(0).tolist())}, info=info)

    def _probe(self, session, rows, meter) -> float | None:
        """Per-token decode speed after a chunked stream: `decode_probe` tokens fed one at a time
        from the state the stream ended in (a full cache), not scored, not metered."""
        count = min(self.decode_probe, 4 if session.policy.recompute else self.decode_probe, rows.shape[1] - 1)
        if count == 0:
            return None
        probe = rows[:, -count - 1 :]
        session.feed(probe[:, :1])  # warm-up: the first one-token forward after chunks
        start = meter.clock()
        for i in range(1, count + 1):
            session.feed(probe[:, i : i + 1])
        return rows.shape[0] * count / (meter.clock() - start)


def check_feeding(task) -> None:
    """`feed` and `chunk_size` of a task that streams (perplexity, needle)."""
    task._require(task.feed in FEEDS, f"feed must be one of {', '.join(FEEDS)}, got {task.feed!r}")
    task._require(
        task.chunk_size is None
        or (isinstance(task.chunk_size, int) and not isinstance(task.chunk_size, bool) and task.chunk_size >= 1),
        f"chunk_size must be an integer >= 1, got {task.chunk_size!r}",
    )


def feeding(session, feed: str, chunk_size: int | None) -> dict:
    """How a run feeds its stream: mode, tokens per forward, token-exact or not (and why a
    requested exact chunking goes token by token)."""
    from streambench.engine.exact_chunks import auto_chunk

    chunk = chunk_size or auto_chunk(session.policy.budget, session.device, session.lm.info.num_heads)
    if feed == "token" or chunk == 1:
        return {"mode": "token", "chunk": 1, "token_exact": True}
    if feed == "approximate":
        return {"mode": "approximate-chunks", "chunk": chunk, "token_exact": False}
    why = session.exact_chunks
    if why is not None:
        return {"mode": "token", "chunk": 1, "token_exact": True, "why_token": why}
    return {"mode": "exact-chunks", "chunk": chunk, "token_exact": True}


def nll_curve(values: list[float]) -> dict:
    """Per-position NLL; long streams are stored as means over equal bins (index = bin start)."""
    n = len(values)
    if n <= FULL_CURVE_LIMIT:
        return {"index": list(range(n)), "value": values, "binned": 1}
    width = -(-n // FULL_CURVE_LIMIT)
    starts = list(range(0, n, width))
    means = [sum(values[s : s + width]) / len(values[s : s + width]) for s in starts]
    return {"index": starts, "value": means, "binned": width}
