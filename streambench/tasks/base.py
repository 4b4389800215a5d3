"""The task interface: a task feeds a stream to a `StreamSession` and scores what comes back.

Tasks are dataclasses whose fields are their arguments (a YAML preset under `tasks/` maps onto
them 1:1). Each declares, per metric, whether higher is better, so reports and gates need no
table of their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from streambench.errors import ConfigError

if TYPE_CHECKING:  # (torch-heavy: a task module imports them inside run())
    from transformers import PreTrainedTokenizerBase

    from streambench.engine.meter import Meter
    from streambench.engine.session import StreamSession


class Progress(Protocol):
    """What a task reports its progress to: `total(n, unit)` once it knows its size, a call with
    the units done (tokens, items, rounds), `close()` at the end (the runner closes it)."""

    def total(self, n: int, unit: str = "tok") -> None: ...

    def __call__(self, n: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """A Progress that shows nothing (library calls, quiet runs, tests)."""

    def total(self, n: int, unit: str = "tok") -> None:
        pass

    def __call__(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class TaskResult:
    metrics: dict[str, float]
    curves: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # what was run (text source, token count, ...)
    # directions of metrics known only once the task ran (lm-eval's tasks declare their own),
    # beside the class's `higher_is_better`
    higher_is_better: dict[str, bool] = field(default_factory=dict)


@dataclass
class Task:
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # bump when a change moves the task's numbers
    summary: ClassVar[str] = ""
    higher_is_better: ClassVar[dict[str, bool]] = {}
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()  # (table header, metric) the CLI prints
    default_budget: ClassVar[int] = 512  # used when the run names no --budget
    batchable: ClassVar[bool] = False  # runs several streams in one batch (--batch-size)
    lanes: ClassVar[bool] = False  # ... as its conversations, ragged (`lanes_refusal`, engine/lanes.py)
    quality: ClassVar[str | None] = None  # the metric the report's Pareto plot puts against KV memory
    # What `streambench run --task NAME` uses unless told otherwise (below a same-name preset, -t
    # and the task flags): sizes for a first run that finishes in minutes on a laptop CPU. Library
    # calls and sweeps get the fields' own defaults.
    run_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        self.configure()

    @property
    def compresses_once(self) -> bool:
        """Prefills each context densely and compresses it once (kvpress's protocol: a task with a
        `protocol` field set to compress-once), so a prefill-only policy can run."""
        return getattr(self, "protocol", None) == "compress-once"

    def configure(self) -> None:
        """Validate arguments; raise ConfigError."""

    def run(
        self, session: StreamSession, tokenizer: PreTrainedTokenizerBase, meter: Meter, progress: Progress
    ) -> TaskResult:
        """Stream the task through `session` (one stream, or `session.batch` in lockstep; the
        runner made it, with the run's policy and budget) and score what comes back.

        Args:
            session: feed token ids with `session.feed(ids, exact=...)`; dialogue turns through
                `tasks.dialogue.chat_format.Conversation`; `fork()`/`checkpoint()` for branches.
            tokenizer: the model's tokenizer.
            meter: call `meter.start(session)` when the measured work begins (after loading data)
                and `meter.step()` after each unit of it; the runner adds the meter's numbers
                (tokens/s, latency, memory, KV peaks) to the result.
            progress: `progress.total(n, unit)` once, then `progress(done)`.

        Returns:
            TaskResult: metrics (named as `higher_is_better` and `columns` declare), curves
            ({name: {index, value}}), per-item records, and `info` on what actually ran.
        """
        raise ConfigError(f"task {self.name} does not implement run(session, tokenizer, meter, progress)")

    def group_refusal(self) -> str | None:
        """Why this task's runs cannot share one batch, the same stream under several policies
        (None: they can, through `run_group`; runs/grouping.py decides which do)."""
        return f"task {self.name} feeds each run alone"

    def lanes_refusal(self) -> str | None:
        """Why `--batch-size` does not play this task's conversations as the ragged streams of one
        batch (None: `run` gets a group session, a copy of the policy per stream, engine/lanes.py)."""
        return f"task {self.name} has no conversations to batch"

    def conversations(self) -> int | None:
        """How many conversations `run` plays, when known before it runs (None: unknown): a batch
        wider than that would carry idle streams."""
        return None

    def feeds_exact_chunks(self, policy) -> bool:
        """Whether `policy` alone would feed this task's stream in exact chunks (then alone is faster)."""
        return False

    def run_group(self, session: StreamSession, tokenizer, meter, progress) -> list[TaskResult]:
        """`run` for a group (session.group: one policy per stream, the same tokens to each): one
        TaskResult per stream, each what `run` gives that policy alone."""
        raise ConfigError(f"task {self.name} does not run groups")

    def stream_tokens(self) -> int | None:
        """Most tokens one stream of this task feeds, when known before it runs (None: unknown).
        The size guard and the cache's preallocation use it: a budget above it needs no buffer."""
        return None

    def context_tokens(self) -> int | None:
        """The context a ratio budget (`--budget 25%`) is a share of: the stream for perplexity,
        the longest haystack for needle; None where it is unknown before the run."""
        return None

    def args(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def columns_for(cls, results: list[dict]) -> tuple[tuple[str, str], ...]:
        """(table header, metric) pairs to show for these results."""
        return cls.columns

    @classmethod
    def report_tables(cls, rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
        """Extra (title, headers, rows) tables for a comparable group in the report (mtbench's
        answers side by side); cells are plain text, escaped by the report."""
        return []

    @classmethod
    def notes(cls, results: list[dict]) -> str:
        """Text printed under the results table (reference points, breakdowns); "" for none."""
        return ""

    def _require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{self.name}: {message}")

    def _check_protocol(self) -> None:
        """`protocol` (one of the task's PROTOCOLS) and compress-once's `compression_ratio`."""
        protocols = getattr(self, "PROTOCOLS", ())
        protocol = getattr(self, "protocol", None)
        self._require(protocol in protocols, f"protocol must be one of {', '.join(protocols)}, got {protocol!r}")
        ratio = getattr(self, "compression_ratio", None)
        self._require(
            ratio is None or (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1),
            f"compression_ratio must be a number in [0, 1), got {ratio!r}",
        )
        self._require(ratio is None or self.compresses_once, "compression_ratio applies to protocol=compress-once")

    def _check_limit(self) -> None:
        limit = getattr(self, "limit", None)
        self._require(limit is None or (isinstance(limit, int) and limit >= 1), f"limit must be >= 1, got {limit!r}")
