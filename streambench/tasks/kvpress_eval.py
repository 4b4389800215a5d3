"""kvpress-eval: kvpress's evaluation protocol on its datasets, in both protocols.

NVIDIA kvpress evaluates on datasets of one schema (`context`, `question`, `answer_prefix`,
`answer`, `max_new_tokens`; RULER, LongBench, InfiniteBench, ... as `simonjegou/ruler` and its
siblings on the hub): the context is rendered with the model's chat template and a separator
(`KVPressTextGenerationPipeline.preprocess`: the template's end of the user turn and the
assistant's start go with the question), prefilled, compressed, then each question is answered
by greedy decoding (`generate_answer`, positions continuing from the context's length). RULER's
score is string match (`evaluation/benchmarks/ruler/calculate_metrics.py`): the share of the
reference answers found in the prediction, case-insensitively (`string_match_all`), or whether
any is (`string_match_part`, for `qa_*` tasks), in percent.

`protocol`: compress-once (kvpress's: context prefilled densely, compressed once to the budget or
by `compression_ratio`, positions kept, no eviction after) or stream (the context and question
fed through the policy as one stream, evicting as they come, the answer generated the same way).
`data`: a local .jsonl or .parquet file of that schema, or `hf:<dataset>[:<config>][@<split>]`
(needs network: a GPU box). `limit`: rows. `max_context`: contexts longer are truncated, as
kvpress's `max_context_length`. One row is one stream (the cache is reset between rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from streambench.errors import DataError
from streambench.tasks import register_task
from streambench.tasks.base import Task, TaskResult

_CONTROL = re.compile(r"[\x00-\x1f]")


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER: the share of the references found in the prediction (0-100)."""
    return 100.0 * sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's qa tasks: 100 if any reference is in the prediction."""
    return 100.0 * max(float(r.lower() in prediction.lower()) for r in references)


def load_rows(source: str, limit: int | None) -> list[dict[str, Any]]:
    """Rows of kvpress's schema from a .jsonl/.parquet file or `hf:dataset[:config][@split]`."""
    if source.startswith("hf:"):
        spec, _, split = source[3:].partition("@")
        name, _, config = spec.partition(":")
        try:
            import datasets

            table = datasets.load_dataset(name, config or None, split=split or "test")
        except Exception as exc:  # offline, unknown dataset, bad config
            raise DataError(f"cannot load {source} from the hub: {str(exc).splitlines()[0][:200]}") from None
        raw = [dict(table[i]) for i in range(len(table) if limit is None else min(limit, len(table)))]
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"kvpress-eval data not found: {source}")
        if path.suffix == ".parquet":
            try:
                import pandas as pd

                raw = pd.read_parquet(path).to_dict("records")
            except Exception as exc:
                raise DataError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}") from None
        else:
            from streambench.tasks.dialogue.items import read_jsonl

            raw = [record for _, record in read_jsonl(path)]
    rows = []
    for i, record in enumerate(raw if limit is None else raw[:limit], 1):
        where = f"{source}: row {i}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: not an object")
        for key in ("context", "question"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string")
        answer = record.get("answer")
        if isinstance(answer, str):
            answer = [answer]
        if hasattr(answer, "tolist"):
            answer = answer.tolist()
        if not isinstance(answer, list) or not answer or not all(isinstance(a, str) for a in answer):
            raise DataError(f"{where}: 'answer' must be a string or a list of strings")
        tokens = record.get("max_new_tokens", 50)
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or not 1 <= tokens <= 4096:
            raise DataError(f"{where}: 'max_new_tokens' must be an integer from 1 to 4096, got {tokens!r}")
        rows.append(
            {
                "context": record["context"],
                "question": record["question"],
                "answer_prefix": str(record.get("answer_prefix") or ""),
                "answer": answer,
                "max_new_tokens": int(tokens),
                "task": str(record.get("task") or ""),
            }
        )
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


def render(tokenizer, context: str, question: str, answer_prefix: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids) as kvpress's pipeline renders them."""
    if getattr(tokenizer, "chat_template", None) is None:
        context = (getattr(tokenizer, "bos_token", "") or "") + context
        suffix = "\n"
    else:
        separator = "#" * (len(context) + 10)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + separator}], add_generation_prompt=True, tokenize=False
        )
        context, suffix = rendered.split(separator)
    ids = tokenizer.encode(context, add_special_tokens=False)
    return ids, tokenizer.encode(question + suffix + answer_prefix, add_special_tokens=False)


@register_task("kvpress-eval")
@dataclass
class KVPressEvalTask(Task):
    """kvpress's evaluation (its dataset schema, chat rendering, greedy answers, RULER's string
    match) under any policy, compressed once as kvpress does or streamed (module docstring)."""

    version = 1
    summary = "kvpress's datasets (RULER, ...) compressed once or streamed (string match)"
    higher_is_better = {"string_match": True}
    columns = (("rows", "rows"), ("string match", "string_match"), ("kept of context", "kept_share"))
    quality = "string_match"
    default_budget = 1024

    data: str = ""
    limit: int | None = 20
    protocol: str = "compress-once"
    compression_ratio: float | None = None
    max_context: int = 32768

    PROTOCOLS: ClassVar[tuple[str, ...]] = ("compress-once", "stream")

    def configure(self) -> None:
        from streambench.tasks.dialogue.items import check_local

        self._require(isinstance(self.data, str) and bool(self.data.strip()), "data must name a file or hf:<dataset>")
        if not self.data.startswith("hf:"):
            check_local(self.data)
        self._check_limit()
        self._check_protocol()
        self._require(
            isinstance(self.max_context, int) and not isinstance(self.max_context, bool) and self.max_context >= 16,
            f"max_context must be an integer >= 16, got {self.max_context!r}",
        )

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        import contextlib

        import torch

        from streambench.engine.generation import generate
        from streambench.tasks.dialogue.items import provenance

        rows = load_rows(self.data, self.limit)
        once = self.compresses_once
        stops = {tokenizer.eos_token_id} - {None}
        records = []
        progress.total(len(rows), "row")
        meter.start(session)
        for row in rows:
            context, question = render(tokenizer, row["context"], row["question"], row["answer_prefix"])
            truncated = len(context) > self.max_context
            context = context[: self.max_context]
            session.reset()
            device = session.device
            with session.unbounded() if once else contextlib.nullcontext():
                step = min(session.max_incoming or 1024, 1024)
                for first in range(0, len(context), step):
                    session.feed(torch.tensor([context[first : first + step]], device=device), exact=not once)
                if once and session.evicts:
                    ratio = self.compression_ratio
                    session.compress(int(len(context) * (1 - ratio)) if ratio is not None else session.budget)
                kept = session.kv_tokens
                written = generate(
                    session,
                    prompt=torch.tensor([question], device=device),
                    max_new_tokens=row["max_new_tokens"],
                    stop_ids=stops,
                )
            meter.step()
            progress(1)
            prediction = _CONTROL.sub("", tokenizer.decode(written.tokens, skip_special_tokens=True).strip()).strip()
            match = string_match_part if row["task"].split("_")[0] == "qa" else string_match_all
            records.append(
                {
                    "task": row["task"],
                    "answer": row["answer"],
                    "predicted_answer": prediction,
                    "string_match": round(match(prediction, row["answer"]), 2),
                    "context_tokens": len(context),
                    "kv_tokens_at_question": kept,
                    **({"truncated": True} if truncated else {}),
                }
            )
        scores = [r["string_match"] for r in records]
        metrics = {
            "rows": len(records),
            "string_match": float(np.mean(scores)),
            "kept_share": float(np.mean([r["kv_tokens_at_question"] / max(r["context_tokens"], 1) for r in records])),
        }
        for task in sorted({r["task"] for r in records if r["task"]}):
            metrics[f"string_match/{task}"] = float(np.mean([r["string_match"] for r in records if r["task"] == task]))
        info = {
            "data": self.data,
            "protocol": self.protocol,
            "scoring": "RULER string match (kvpress evaluation/benchmarks/ruler/calculate_metrics.py)",
            **({"data_file": provenance(self.data)} if not self.data.startswith("hf:") else {}),
        }
        return TaskResult(
            metrics=metrics,
            records=records,
            info=info,
            higher_is_better={k: True for k in metrics if k.startswith("string_match/")},
        )
