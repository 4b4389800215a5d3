"""The task interface: a task feeds a stream to a `StreamSession` and scores what comes back.

Tasks are dataclasses whose fields are their arguments (a YAML preset under `tasks/` maps onto
them 1:1). Each declares, per metric, whether higher is better, so reports and gates need no
table of their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from streambench.errors import ConfigError


@dataclass
class TaskResult:
    metrics: dict[str, float]
    curves: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # what was run (text source, token count, ...)


@dataclass
class Task:
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1  # bump when a change moves the task's numbers
    summary: ClassVar[str] = ""
    higher_is_better: ClassVar[dict[str, bool]] = {}
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()  # (table header, metric) the CLI prints
    default_budget: ClassVar[int] = 512  # used when the run names no --budget
    batchable: ClassVar[bool] = False  # runs several streams in one batch (--batch-size)
    quality: ClassVar[str | None] = None  # the metric the report's Pareto plot puts against KV memory
    # What `streambench run --task NAME` uses unless told otherwise (below a same-name preset, -t
    # and the task flags): sizes for a first run that finishes in minutes on a laptop CPU. Library
    # calls and sweeps get the fields' own defaults.
    run_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        self.configure()

    def configure(self) -> None:
        """Validate arguments; raise ConfigError."""

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        raise ConfigError(f"task {self.name} does not implement run(session, tokenizer, meter, progress)")

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

    def _check_limit(self) -> None:
        limit = getattr(self, "limit", None)
        self._require(limit is None or (isinstance(limit, int) and limit >= 1), f"limit must be >= 1, got {limit!r}")
