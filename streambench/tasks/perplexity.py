"""Streaming perplexity: feed a long text token by token, score each next token under the cache.

As mit-han-lab/streaming-llm `examples/eval_long_ppl.py`: the token at position t is fed, the
logits it produces score token t+1, the policy evicts between steps. `chunk_size` > 1 feeds that
many tokens per forward and evicts between chunks: much faster, not token-exact (tokens early in a
chunk see fewer than `budget` keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from streambench.data import DEFAULT_TEXT, check_source, load_text
from streambench.errors import DataError
from streambench.tasks import register_task
from streambench.tasks.base import Task, TaskResult

FULL_CURVE_LIMIT = 8192  # longer streams store the NLL curve as bin means


@register_task("perplexity", "ppl")
@dataclass
class PerplexityTask(Task):
    """Perplexity of a long text streamed through the policy (StreamingLLM, Fig. 3)."""

    version = 1
    summary = "streaming perplexity of a long text, token by token (or in chunks)"
    higher_is_better = {"ppl": False, "ppl_last_half": False, "nll_mean": False}
    columns = (("tokens", "tokens"), ("PPL", "ppl"), ("PPL last half", "ppl_last_half"))
    default_budget = 64  # with 768 tokens: the papers' effect in a few CPU minutes

    text: str = DEFAULT_TEXT
    tokens: int = 2048
    chunk_size: int = 1
    split: str = "test"
    field: str = "text"
    index: int = 0

    def configure(self) -> None:
        self._require(isinstance(self.tokens, int) and self.tokens >= 2, f"tokens must be an integer >= 2, got {self.tokens!r}")
        self._require(isinstance(self.chunk_size, int) and self.chunk_size >= 1, f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        check_source(self.text)  # a missing file fails now, not after the model has loaded

    def token_ids(self, tokenizer) -> list[int]:
        text = load_text(self.text, self.split, self.field, self.index)
        ids = tokenizer(text)["input_ids"]
        if len(ids) < self.tokens:
            raise DataError(f"text {self.text} has {len(ids)} tokens, fewer than the {self.tokens} requested")
        return ids[: self.tokens]

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        import torch
        import torch.nn.functional as F

        ids = torch.tensor(self.token_ids(tokenizer), device=session.device)[None]
        n_pred = ids.shape[1] - 1
        nll = torch.empty(n_pred, dtype=torch.float32, device=session.device)
        step = self.chunk_size
        progress.total(n_pred, "tok")
        meter.start()
        for start in range(0, n_pred, step):
            end = min(start + step, n_pred)
            logits = session.feed(ids[:, start:end])
            nll[start:end] = F.cross_entropy(logits[0].float(), ids[0, start + 1 : end + 1], reduction="none")
            meter.step(end - start, session.kv_tokens, session.kv_bytes)
            progress(end - start)
        values = nll.double().cpu()
        half = values[n_pred // 2 :]
        metrics = {
            "ppl": math.exp(values.mean().item()),
            "ppl_last_half": math.exp(half.mean().item()),
            "nll_mean": values.mean().item(),
        }
        return TaskResult(
            metrics=metrics,
            curves={"nll": nll_curve(values.tolist())},
            info={"text": self.text, "tokens_streamed": ids.shape[1], "predictions": n_pred, "token_exact": step == 1},
        )


def nll_curve(values: list[float]) -> dict:
    """Per-position NLL; long streams are stored as means over equal bins (index = bin start)."""
    n = len(values)
    if n <= FULL_CURVE_LIMIT:
        return {"index": list(range(n)), "value": values, "binned": 1}
    width = -(-n // FULL_CURVE_LIMIT)
    starts = list(range(0, n, width))
    means = [sum(values[s : s + width]) / len(values[s : s + width]) for s in starts]
    return {"index": starts, "value": means, "binned": width}
