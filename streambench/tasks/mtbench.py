"""mtbench: MT-Bench prompts answered one after another in ONE stream, the StreamingLLM chat demo.

mit-han-lab/streaming-llm `examples/run_streaming_llama.py` flattens the `turns` of every question
of `data/mt_bench.jsonl` into one list of prompts and answers each with greedy decoding on one
KV cache, evicting before each prompt for the prompt and its answer (`evict_for_space`). Here the
same stream goes through the chat template (streambench/tasks/dialogue/chat_format.py `Conversation.reply`), under
any policy, with answers up to `max_new_tokens` (greedy, or seeded sampling).

What it measures needs no judge model:
- per turn and overall: tokens written, time to first token, generation tokens/s, KV tokens and
  bytes when the answer is done;
- `eos_rate`: the share of answers that end by the turn's end token rather than the limit;
- `repetition`: the share of an answer's 4-grams of tokens that repeat an earlier 4-gram of the
  same answer (0 = none repeated; a degenerating cache typically loops);
- `dense_nll` (`-t dense_nll=true`, costs a dense stream beside the policy's): the mean per-token
  NLL of the policy's own answer under a dense session fed the very same stream (every prompt and
  every answer the policy wrote): how unlikely the answer is to the model with everything in
  memory, beside `own_nll`, the same answer's NLL under the policy's own cache as it wrote it.
  Under dense the two are equal (the test checks it): the shadow is the same stream.
The answers are kept in the records and shown side by side in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

from streambench.errors import DataError
from streambench.run_fields import label
from streambench.tasks import register_task
from streambench.tasks.base import Task, TaskResult

UPSTREAM = "https://raw.githubusercontent.com/mit-han-lab/streaming-llm/main/data/mt_bench.jsonl"
EXCERPT_CHARS = 160  # the first characters of each answer, in the report
PROMPT_CHARS = 60  # ... and of the prompt it answers


def load_questions(source: str, limit: int | None = None) -> list[dict]:
    """Records {question_id, category, turns: [str, ...]} from a JSONL file (path or URL)."""
    from streambench.tasks.dialogue.items import fetch, read_jsonl
    from streambench.tasks.texts import valid_text

    path = fetch(source)
    questions = []
    for line, record in read_jsonl(path):
        turns = record.get("turns") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DataError(f"{path}:{line}: an MT-Bench record needs 'turns', a list of non-empty strings")
        qid = record.get("question_id", len(questions))
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise DataError(f"{path}:{line}: question_id must be an integer or a string, got {qid!r}"[:300])
        if isinstance(qid, str):
            qid = valid_text(qid)[0]
        cleaned = [valid_text(t) for t in turns]  # lone surrogates ("\udce9") cannot be tokenized
        questions.append(
            {
                "question_id": qid,
                "category": valid_text(str(record.get("category", "")))[0],
                "turns": [t for t, _ in cleaned],
                "replaced": sum(n for _, n in cleaned),
            }
        )
        if limit and len(questions) == limit:
            break
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def repetition(tokens: list[int], n: int = 4) -> float | None:
    """Share of the n-grams that repeat an earlier one of the same answer (None: too short)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


@register_task("mtbench")
@dataclass
class MTBenchTask(Task):
    """`data`: streaming-llm's mt_bench.jsonl format (path or URL; the default is upstream's file,
    downloaded once into the streambench cache). `limit`: questions (each with its turns).
    `max_new_tokens`: per answer. `temperature`/`top_p`/`seed`: sampling (0: greedy).
    `dense_nll`: score each answer under a dense stream fed the same tokens (doubles the work).
    `format`: template (default), plain (SirLLM's USER/ASSISTANT for models without a template)."""

    version = 1
    summary = "MT-Bench prompts answered in one endless stream (generation under the policy)"
    higher_is_better = {
        "eos_rate": True,
        "repetition": False,
        "dense_nll": False,
        "own_nll": False,
        "ttft_ms": False,
        "answer_tokens": True,
    }
    # generation speed is the engine's "decode tok/s" column (decode_tokens_per_s: one token per forward)
    columns = (
        ("turns", "turns"),
        ("answer tok", "answer_tokens"),
        ("EOS stop", "eos_rate"),
        ("repetition", "repetition"),
        ("dense NLL", "dense_nll"),
        ("TTFT ms", "ttft_ms"),
    )
    default_budget = 512
    quality = "repetition"

    data: str = UPSTREAM
    limit: int | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dense_nll: bool = False
    format: str = "template"

    def configure(self) -> None:
        from streambench.engine.generation import Sampling
        from streambench.tasks.dialogue.items import check_local

        self._check_limit()
        self._require(
            isinstance(self.max_new_tokens, int)
            and not isinstance(self.max_new_tokens, bool)
            and self.max_new_tokens >= 1,
            f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}",
        )
        self._require(isinstance(self.dense_nll, bool), f"dense_nll must be true or false, got {self.dense_nll!r}")
        self._require(self.format in ("template", "plain"), f"format must be template or plain, got {self.format!r}")
        self._require(isinstance(self.data, str) and bool(self.data), "data must be a path or URL")
        Sampling(self.temperature, self.top_p, self.seed)  # bad sampling values fail now
        check_local(self.data)
        if not self.data.startswith(("http://", "https://")):
            load_questions(self.data, self.limit)  # a malformed local file fails before the model loads

    @classmethod
    def columns_for(cls, results: list[dict]):
        scored = any("dense_nll" in r["metrics"] for r in results)
        return tuple(c for c in cls.columns if c[1] != "dense_nll" or scored)

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        import time

        from streambench.engine.generation import Sampling
        from streambench.engine.session import StreamSession
        from streambench.policies.dense import DensePolicy
        from streambench.tasks.dialogue.chat_format import ChatFormat, Conversation
        from streambench.tasks.dialogue.items import provenance

        questions = load_questions(self.data, self.limit)
        replaced = sum(q["replaced"] for q in questions)
        if replaced:
            import warnings

            from streambench.errors import DataWarning

            warnings.warn(
                f"{self.data}: {replaced:,} lone surrogate escape(s) in the prompts read as U+FFFD", DataWarning
            )
        fmt = ChatFormat.named(tokenizer, self.format)
        conversation = Conversation(session, tokenizer, fmt)
        sampling = Sampling(self.temperature, self.top_p, self.seed)
        dense = None
        if self.dense_nll:
            dense = StreamSession(session.lm, DensePolicy())
            shadow = Conversation(dense, tokenizer, fmt)
        progress.total(sum(len(q["turns"]) for q in questions), "turns")
        records = []
        meter.start(session)
        for q in questions:
            for turn, prompt in enumerate(q["turns"]):
                written = conversation.reply(prompt, self.max_new_tokens, sampling, score=self.dense_nll)
                meter.step()
                started = time.perf_counter()
                record = {
                    "question_id": q["question_id"],
                    "category": q["category"],
                    "turn": turn + 1,
                    "prompt": prompt,
                    "answer": tokenizer.decode(written.tokens, skip_special_tokens=True),
                    "tokens": len(written.tokens),
                    "stop": written.stop,
                    "ttft_ms": 1000 * written.first_token_s,
                    "tokens_per_s": written.tokens_per_s,
                    "kv_tokens": session.kv_tokens,
                    "kv_mib": session.kv_bytes / 2**20,
                    "repetition": repetition(written.tokens),
                }
                if dense is not None:  # the same turn, the policy's answer, with everything in memory
                    nll = shadow.replay(prompt, written.tokens)
                    if nll is not None:
                        record["dense_nll"] = nll
                        record["own_nll"] = -sum(written.logprobs) / len(written.logprobs)  # under the policy's cache
                    meter.exclude(time.perf_counter() - started)
                records.append(record)
                progress(1)
        if dense is not None:
            dense.close()
        return TaskResult(
            self._metrics(records),
            records=records,
            info={
                "questions": len(questions),
                "data": provenance(self.data),
                "format": self.format,
                **({"undecodable_replaced": replaced} if replaced else {}),
                "sampling": {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed},
            },
        )

    @staticmethod
    def _metrics(records: list[dict]) -> dict:
        import numpy as np

        def mean(key):
            values = [r[key] for r in records if r.get(key) is not None]
            return float(np.mean(values)) if values else None

        written = sum(r["tokens"] for r in records)
        metrics = {
            "turns": len(records),
            "answer_tokens": mean("tokens"),
            "generated_tokens": written,
            "eos_rate": float(np.mean([r["stop"] == "eos" for r in records])),
            "repetition": mean("repetition"),
            "ttft_ms": mean("ttft_ms"),
            "decode_tokens_per_s": mean("tokens_per_s"),
            "dense_nll": mean("dense_nll"),
            "own_nll": mean("own_nll"),
        }
        return {k: v for k, v in metrics.items() if v is not None}

    @classmethod
    def report_tables(cls, rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
        """The answers side by side: one row per turn, one column per run (first characters)."""
        runs = [r for r in rows if r.get("records")]
        if not runs:
            return []
        names = [label(r) for r in runs]
        keyed = [{(x.get("question_id"), x.get("turn")): x for x in r["records"]} for r in runs]
        order = list(dict.fromkeys(k for table in keyed for k in table))
        body = []
        prompts = {k: x.get("prompt", "") for table in keyed for k, x in table.items()}
        for key in order:
            asked = " ".join(str(prompts.get(key, "")).split())
            cells = [f"{key[0]}.{key[1]} " + asked[:PROMPT_CHARS] + ("..." if len(asked) > PROMPT_CHARS else "")]
            for table in keyed:
                x = table.get(key)
                text = " ".join(str(x.get("answer", "")).split()) if x else ""
                cut = text[:EXCERPT_CHARS] + ("..." if len(text) > EXCERPT_CHARS else "")
                cells.append(f"{cut} [{x.get('stop')}, {x.get('tokens')} tok]" if x else "")
            body.append(cells)
        return [
            (
                "Answers, side by side (first characters; [why it stopped, tokens])",
                ["question.turn, prompt", *names],
                body,
            )
        ]
