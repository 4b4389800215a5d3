"""needle: a fact hidden in a haystack at a chosen depth, asked for at the end of the stream.

The needle-in-a-haystack test (G. Kamradt, 2023; the depth x length heatmaps of kvpress and
KVCache-Factory): a sentence carrying a random value ("The special magic number is 48213.") is
inserted at depths 0-100% of haystacks of several lengths; the question follows; everything is
streamed through the policy as one stream (the StreamingLLM protocol: the policy evicts as the
tokens come, token-exactly in chunks where it can). Scored per cell: exact match of the greedy
answer, NLL of the value as the answer (teacher-forced, on a `StreamSession.fork`), and the share
of the needle's tokens the cache holds when the question has been read.

`protocol=compress-once` runs kvpress's protocol instead (its RULER and needle evaluations): the
context (haystack and needle) is prefilled densely, compressed once by the policy to the budget,
or by `compression_ratio` as kvpress's presses are (keep int(n * (1 - ratio))), keeping the kept
tokens' positions as kvpress does; then the question is read and the answer scored and written
with no further eviction. The policy never sees the question before it compresses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from streambench.errors import DataError
from streambench.tasks import register_task
from streambench.tasks.base import Task, TaskResult
from streambench.tasks.perplexity import check_feeding, feeding
from streambench.tasks.texts import DEFAULT_TEXT, check_source, load_text

KINDS = {  # value kind: (needle template, question, the answer's lead-in)
    "number": (
        "The special magic number is {value}.",
        "What is the special magic number?",
        "The special magic number is",
    ),
    "name": (
        "The name of the secret agent is {value}.",
        "What is the name of the secret agent?",
        "The name of the secret agent is",
    ),
    "passkey": (
        "The pass key is {value}. Remember it. {value} is the pass key.",
        "What is the pass key?",
        "The pass key is",
    ),
}
MAX_CELLS = 100_000  # the grid is built before the run; 100,000 cells of >= 64 tokens is days of streaming already
NAMES = (
    "Alice",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hiroshi",
    "Ingrid",
    "Jamal",
    "Katya",
    "Lorenzo",
    "Mariam",
    "Nikolai",
    "Olga",
    "Pedro",
    "Quentin",
    "Rosa",
    "Sven",
    "Tamara",
    "Umberto",
    "Vera",
    "Walter",
    "Ximena",
    "Yusuf",
    "Zofia",
)


def _numbers(value, what: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        out = [int(str(v).strip().rstrip("%")) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {value!r}") from None
    return out


@register_task("needle", "niah")
@dataclass
class NeedleTask(Task):
    """`lengths`: stream lengths in tokens (haystack + needle + question); `depths`: where the
    needle starts, in percent of the haystack (0: first, 100: just before the question), snapped
    back to a line start within 64 tokens; `trials` needles per cell, each with its own seeded
    value and haystack offset. `text`: the haystack (any text source: the embedded play, a file,
    a PG19 book, `hf:` datasets, `filler:passkey`); `kind`: number (5 digits), name, or passkey
    (the passkey-retrieval test's wording). `feed` as for perplexity."""

    version = 1
    summary = "needle in a haystack: depth x length grid (exact match, answer NLL, needle retention)"
    higher_is_better = {"exact_match": True, "answer_nll": False, "needle_retention": True}
    columns = (
        ("cells", "cells"),
        ("exact match", "exact_match"),
        ("answer NLL", "answer_nll"),
        ("needle retention", "needle_retention"),
    )
    default_budget = 128
    quality = "exact_match"

    text: str = DEFAULT_TEXT
    lengths: str | int | list = "256,512,1024"  # comma-separated, or a YAML list
    depths: str | int | list = "0,25,50,75,100"
    trials: int = 1
    kind: str = "number"
    seed: int = 0
    answer_tokens: int = 8
    feed: str = "exact"
    chunk_size: int | None = None
    protocol: str = "stream"  # or "compress-once" (kvpress's)
    compression_ratio: float | None = None  # compress-once: the share removed (default: down to the budget)

    PROTOCOLS: ClassVar[tuple[str, ...]] = ("stream", "compress-once")

    def args(self) -> dict:
        """The protocol fields enter a run's config only when set: every needle result written
        before they existed keeps its config hash (resume, gate)."""
        out = super().args()
        if out.get("protocol") == "stream":
            del out["protocol"]
        if out.get("compression_ratio") is None:
            out.pop("compression_ratio", None)
        return out

    def configure(self) -> None:
        self._check_protocol()
        try:
            lengths, depths = self.length_list(), self.depth_list()
        except ValueError as exc:
            self._require(False, str(exc))
        self._require(
            bool(lengths) and all(n >= 64 for n in lengths), f"lengths must be integers >= 64, got {self.lengths!r}"
        )
        self._require(
            bool(depths) and all(0 <= d <= 100 for d in depths),
            f"depths must be percentages in [0, 100], got {self.depths!r}",
        )
        for name in ("trials", "answer_tokens"):
            value = getattr(self, name)
            self._require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        self._require(self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        cells = len(lengths) * len(depths) * self.trials
        self._require(
            cells <= MAX_CELLS,
            f"{len(lengths)} lengths x {len(depths)} depths x {self.trials:,} trials = "
            f"{cells:,} cells, more than the {MAX_CELLS:,} one run may hold: lower trials",
        )
        check_feeding(self)
        self._require(
            isinstance(self.text, str) and bool(self.text.strip()), f"text must name a text, got {self.text!r}"
        )
        check_source(self.text)

    def length_list(self) -> list[int]:
        return sorted(set(_numbers(self.lengths, "lengths")))

    def depth_list(self) -> list[int]:
        return sorted(set(_numbers(self.depths, "depths")))

    def stream_tokens(self) -> int:
        return max(self.length_list()) + self.answer_tokens + 16

    def context_tokens(self) -> int:
        return max(self.length_list())

    # ---- building a cell -------------------------------------------------------------------------
    def value(self, rng) -> str:
        if self.kind == "name":
            return str(NAMES[int(rng.integers(len(NAMES)))])
        return str(int(rng.integers(10000, 100000)))

    def cells(self):
        """(length, depth, trial, value, haystack offset) for every cell, deterministic for a seed."""
        rng = np.random.default_rng(self.seed)
        out = []
        for length in self.length_list():
            for depth in self.depth_list():
                for trial in range(self.trials):
                    out.append((length, depth, trial, self.value(rng), int(rng.integers(0, 1 << 30))))
        return out

    def question_ids(self, tokenizer) -> list[int]:
        """The question and the answer's lead-in that end every stream (what compress-once feeds
        after compressing)."""
        _, question, lead = KINDS[self.kind]
        return tokenizer("\n" + question + " " + lead, add_special_tokens=False)["input_ids"]

    def build(self, tokenizer, hay: list[int], length: int, depth: int, value: str, offset: int):
        """(ids, needle span, answer ids): the stream of one cell, `length` tokens."""
        needle, question, lead = KINDS[self.kind]
        needle_ids = tokenizer("\n" + needle.format(value=value) + "\n", add_special_tokens=False)["input_ids"]
        tail_ids = self.question_ids(tokenizer)
        answer = tokenizer(" " + value, add_special_tokens=False)["input_ids"]
        room = length - len(needle_ids) - len(tail_ids)
        if room < 1:
            raise DataError(f"needle: length {length} leaves no room for a haystack around the needle and question")
        if len(hay) < room:
            raise DataError(
                f"needle: the text has {len(hay)} tokens, fewer than the {room} a {length}-token haystack needs"
            )
        start = offset % (len(hay) - room + 1)
        at = round(room * depth / 100)
        if 0 < at < room:  # back to the start of a line, if one is within 64 tokens
            before = hay[start + max(0, at - 64) : start + at]
            lines = [i for i, t in enumerate(before) if "\n" in tokenizer.decode([t])]
            if lines:
                at = at - len(before) + lines[-1] + 1
        body = hay[start : start + room]
        ids = body[:at] + needle_ids + body[at:] + tail_ids
        return ids, (at, at + len(needle_ids)), answer

    # ---- running -------------------------------------------------------------------------------
    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        import contextlib

        import torch
        import torch.nn.functional as F

        from streambench.tasks.retention import CacheMap, LaneMap, kept_share

        text = load_text(self.text)
        hay = tokenizer(text, add_special_tokens=False)["input_ids"]
        fed = feeding(session, self.feed, self.chunk_size)
        chunk, exact = fed["chunk"], fed["mode"] == "exact-chunks"
        cells = self.cells()
        mapped = max(cells, key=lambda c: (c[0], -abs(c[1] - 50), -c[2]))  # the longest stream, depth nearest 50%
        cache_map, lane_map = CacheMap(), LaneMap()
        progress.total(sum(c[0] for c in cells), "tok")
        records = []
        once = self.compresses_once
        question = len(self.question_ids(tokenizer)) if once else 0
        # (compress-once: nothing is evicted while the context goes in, so it goes in dense-sized
        # chunks whatever the policy, as kvpress prefills it in one forward)
        from streambench.engine.exact_chunks import auto_chunk  # (torch: only once a task runs)

        prefill = self.chunk_size or auto_chunk(None, session.device, session.lm.info.num_heads)
        meter.start(session)
        for cell in cells:
            length, depth, trial, value, offset = cell
            ids, span, answer = self.build(tokenizer, hay, length, depth, value, offset)
            stream = torch.tensor([ids], device=session.device)
            session.reset()
            if cell == mapped:
                cache_map.tag(np.arange(*span))
            with (
                session.unbounded() if once else contextlib.nullcontext()
            ):  # (compress-once: only the one compression evicts)
                compressed = None
                if once:  # the context prefilled densely, compressed once, then the question
                    context = len(ids) - question
                    for first in range(0, context, prefill):
                        piece = stream[:, first : min(first + prefill, context)]
                        session.feed(piece)
                        meter.step(piece.shape[1])
                        progress(piece.shape[1])
                    ratio = self.compression_ratio
                    if session.evicts:  # (dense, the reference, compresses nothing)
                        session.compress(int(context * (1 - ratio)) if ratio is not None else session.budget)
                    compressed = session.kv_tokens
                    logits = session.feed(stream[:, context:])
                    meter.step(question)
                    progress(question)
                    if cell == mapped:
                        cache_map.record(session.held_positions(), session.fed)
                else:
                    # the mapped stream in finer chunks where that changes nothing but the map's resolution
                    step = max(1, min(chunk, length // 64)) if cell == mapped and exact else chunk
                    for first in range(0, len(ids), step):
                        piece = stream[:, first : first + step]
                        logits = session.feed(piece, exact=exact)
                        meter.step(piece.shape[1])
                        progress(piece.shape[1])
                        if cell == mapped:
                            cache_map.record(session.held_positions(), session.fed)
                if cell == mapped:
                    cache_map.end_stream()
                last = logits[0, -1]
                kept = float(kept_share(session.held_positions(), np.arange(*span)).mean())
                if session.cache is not None:  # (recompute-window holds no lanes)
                    lanes = session.cache.num_layers, session.cache.kv_heads
                    lane_map.sample(session.held_positions(), *lanes, np.arange(*span))
                target = torch.tensor([answer], device=session.device)
                with session.fork():  # the value as the answer, teacher-forced
                    forced = session.feed(target, exact=fed["token_exact"] and not once)[0]
                    predicted = torch.cat([last[None], forced[:-1]]).float()
                    nll = F.cross_entropy(predicted, target[0]).item()
                written = []
                for _ in range(self.answer_tokens):
                    token = int(last.argmax())
                    if token == tokenizer.eos_token_id:
                        break
                    written.append(token)
                    last = session.feed(torch.tensor([[token]], device=session.device))[0, -1]
            reply = tokenizer.decode(written, skip_special_tokens=True)
            records.append(
                {
                    "length": length,
                    "depth": depth,
                    "trial": trial,
                    "value": value,
                    "needle_at": span[0],
                    "needle_tokens": span[1] - span[0],
                    "stream_tokens": len(ids),
                    "answer": reply,
                    "match": _matches(reply, value),
                    "answer_nll": round(nll, 4),
                    "needle_retention": round(kept, 4),
                    **({"context_tokens": len(ids) - question, "compressed_to": compressed} if once else {}),
                }
            )
        grid = self.grid(records)
        metrics = {
            "cells": len(records),
            "exact_match": float(np.mean([r["match"] for r in records])),
            "answer_nll": float(np.mean([r["answer_nll"] for r in records])),
            "needle_retention": float(np.mean([r["needle_retention"] for r in records])),
        }
        curves = {"needle_grid": grid}
        if cache_map.curve():
            curves["cache_map"] = cache_map.curve()
        if lane_map.curve():
            curves["lane_map"] = lane_map.curve()
        info = {
            "text": self.text,
            "kind": self.kind,
            "facts": "the needle sentence's tokens",
            "feeding": fed,
            "cache_map_cell": {"length": mapped[0], "depth": mapped[1], "trial": mapped[2]},
            "protocol": self.protocol,
        }
        if once:
            info["compress_once"] = (
                f"context compressed once by {session.policy.name} to "
                + (
                    f"{1 - self.compression_ratio:g} of its tokens"
                    if self.compression_ratio is not None
                    else "the budget"
                )
                + ", kept positions as fed (kvpress's protocol); the question and answer then evict nothing"
            )
        return TaskResult(metrics=metrics, curves=curves, records=records, info=info)

    def grid(self, records: list[dict]) -> dict:
        """Per (depth, length): mean exact match, answer NLL and needle retention over the trials."""
        lengths, depths = self.length_list(), self.depth_list()
        out = {"lengths": lengths, "depths": depths}
        for key in ("match", "answer_nll", "needle_retention"):
            table = []
            for d in depths:
                row = []
                for n in lengths:
                    values = [float(r[key]) for r in records if r["length"] == n and r["depth"] == d]
                    row.append(round(float(np.mean(values)), 4) if values else math.nan)
                table.append(row)
            out[key] = table
        return out


def _matches(reply: str, value: str) -> bool:
    """Exact match: the reply's first word is the value (trailing punctuation aside)."""
    words = reply.strip().split()
    return bool(words) and words[0].rstrip(".,;:!?\"')") == value
