"""Lanes: several conversations, each written as if alone, played as the ragged streams of one batch.

A dialogue task's code talks to a session one turn at a time (chat_format.py `Conversation`:
feed the question, score the replies, feed the chosen one) and decides its next turn from what
came back. To batch B conversations without writing that logic twice, each runs in its own
thread against a `Lane`, a stand-in for its stream of a group session (engine/ragged.py). A call
that runs the model waits until every live lane waits on one; then the lanes that asked for the
same kind of call (feed, branches, reserve, a new conversation) go in one batched call, and the
others wait on: a lane with nothing to feed is not a row of that forward (nor a stall). Calls
that concern the whole batch (a side question's fork, a checkpoint) wait for every live lane
and run once.

Only one thread runs at a time (a lane holds the lock except while it waits), so the lanes'
own work (a softmax over a reply's logits, the retention bookkeeping) never overlaps a forward
or another lane's: the threads order the work, they add no parallelism. A lane reads its
stream's state (tokens fed, held positions) directly: nothing changes it while the lane runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streambench.errors import DataError

if TYPE_CHECKING:
    from streambench.engine.session import StreamSession

# calls that batch the lanes asking for them (the others wait); the rest wait for every live lane
PARTIAL = ("feed", "branches", "reserve", "reset")


class LanesOutOfStep(DataError):
    """Every live lane waits, on calls that cannot run together (e.g. one asks a side question
    while another starts a new conversation): the task's conversations are not alike enough."""


class _Aborted(Exception):
    """Another lane failed: this one stops where it waits."""


class Lanes:
    """Run `jobs[b](lane_b)` for each stream b of a group session, batched as described above."""

    def __init__(self, session: StreamSession):
        if session.group is None:
            raise RuntimeError("lanes need a group session (a policy per stream)")
        self.session = session
        self.cond = threading.Condition()
        self.waiting: dict[int, tuple[str, Any]] = {}
        self.results: dict[int, Any] = {}
        self.live: set[int] = set()
        self.error: BaseException | None = None
        self.calls = {kind: 0 for kind in (*PARTIAL, "fork", "unfork", "checkpoint", "rollback")}

    def run(self, jobs: list[Callable[[Lane], Any]]) -> list[Any]:
        if len(jobs) > self.session.batch:
            raise ValueError(f"{len(jobs)} jobs for {self.session.batch} streams")
        out: list[Any] = [None] * len(jobs)
        self.live = set(range(len(jobs)))

        def work(b: int) -> None:
            with self.cond:
                try:
                    out[b] = jobs[b](Lane(self, b))
                except _Aborted:
                    pass
                except BaseException as exc:  # (KeyboardInterrupt reaches the main thread only)
                    if self.error is None:
                        self.error = exc
                finally:
                    self.live.discard(b)
                    self.waiting.pop(b, None)
                    if self.error is None:
                        self._dispatch()
                    self.cond.notify_all()

        threads = [threading.Thread(target=work, args=(b,), daemon=True, name=f"lane-{b}") for b in range(len(jobs))]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)  # (a timeout keeps the main thread interruptible)
        except BaseException:
            with self.cond:
                if self.error is None:
                    self.error = _Aborted()
                self.cond.notify_all()
            for thread in threads:
                thread.join()
            raise
        if self.error is not None:
            raise self.error
        return out

    # ---- called with the lock held --------------------------------------------------------
    def call(self, b: int, kind: str, arg: Any = None) -> Any:
        if self.error is not None:
            raise _Aborted()
        self.waiting[b] = (kind, arg)
        self._dispatch()
        while b in self.waiting:
            if self.error is not None:
                raise _Aborted()
            self.cond.wait()
        if self.error is not None:
            raise _Aborted()
        return self.results.pop(b)

    def _dispatch(self) -> None:
        """When every live lane waits: run one batched call, hand out its results."""
        while self.live and len(self.waiting) == len(self.live) and self.error is None:
            kinds = [kind for kind, _ in self.waiting.values()]
            partial = [k for k in PARTIAL if k in kinds]
            cheap = [k for k in ("reset", "reserve") if k in kinds]
            kind: str
            if cheap:  # (no forward: the lanes behind catch up before the next one)
                kind = cheap[0]
            elif partial:
                kind = max(partial, key=kinds.count)
            elif len(set(kinds)) == 1:
                kind = kinds[0]
            else:
                self.error = LanesOutOfStep(
                    "the batched conversations fell out of step (" + ", ".join(sorted(set(kinds))) + "): "
                    "run this task with --batch-size 1"
                )
                self.cond.notify_all()
                return
            lanes = sorted(b for b, (k, _) in self.waiting.items() if k == kind)
            args = {b: self.waiting[b][1] for b in lanes}
            try:
                with torch.no_grad():
                    results = self._execute(kind, args)
            except BaseException as exc:
                self.error = exc
                self.cond.notify_all()
                return
            self.calls[kind] += 1
            for b in lanes:
                self.results[b] = results.get(b)
                del self.waiting[b]
            self.cond.notify_all()

    def _execute(self, kind: str, args: dict[int, Any]) -> dict[int, Any]:
        session, batch = self.session, self.session.batch
        if kind == "feed":
            logits = session.feed_streams([args.get(b) for b in range(batch)])
            return {b: logits[b] for b in args}
        if kind == "branches":
            scored = session.branches_streams([args.get(b) for b in range(batch)])
            return {b: scored[b] for b in args}
        if kind == "reserve":
            session.reserve_streams([args.get(b, 0) for b in range(batch)])
            return {}
        if kind == "reset":  # (those that ended start with them: their conversations are over)
            done = [b for b in range(batch) if b not in self.live]
            session.reset_streams(sorted(set(args) | set(done)))
            return {}
        if kind in ("fork", "checkpoint"):
            state = session.snapshot()
            return {b: state for b in args}
        if kind == "unfork":
            session.restore(next(iter(args.values())))
            return {}
        if kind == "rollback":
            session.restore(next(iter(args.values())), keep=True)
            return {}
        raise ValueError(kind)


class Lane:
    """Stream `index` of a group session, as the dialogue code uses a session alone."""

    def __init__(self, lanes: Lanes, index: int):
        self.lanes, self.index = lanes, index
        self.session = lanes.session
        self.device = self.session.device

    @property
    def policy(self):
        return self.session.group[self.index]

    @property
    def fed(self) -> int:
        return int(self.session.stream_fed[self.index])

    @property
    def kv_tokens(self) -> int:
        return self.session.streams_kv()[self.index][0]

    @property
    def kv_bytes(self) -> int:
        return self.session.streams_kv()[self.index][1]

    def held_positions(self) -> np.ndarray:
        return self.session.held_positions(self.index)

    def new_round(self) -> None:
        self.session.cache.rescale_scores(self.policy.new_round, stream=self.index)

    def reserve(self, count: int) -> None:
        self.lanes.call(self.index, "reserve", int(count))

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.lanes.call(self.index, "feed", ids)
        return out if out is not None else ids.new_zeros((1, 0, 0), dtype=torch.float32)

    def score_branches(self, branches: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.lanes.call(self.index, "branches", list(branches))

    def reset(self) -> None:
        self.lanes.call(self.index, "reset")

    def checkpoint(self):
        return self.lanes.call(self.index, "checkpoint")

    def rollback(self, state) -> None:
        self.lanes.call(self.index, "rollback", state)

    @contextmanager
    def fork(self) -> Iterator[Lane]:
        state = self.lanes.call(self.index, "fork")
        try:
            yield self
        finally:
            self.lanes.call(self.index, "unfork", state)


class LanesGauge:
    """What a run's meter reads of a batch of lanes: every stream's tokens (tokens/s is the run's
    rate), and one stream's KV tokens and bytes (the largest; what a conversation holds)."""

    shared = True  # (every conversation's step reads one count: the meter counts each token once)

    def __init__(self, session: StreamSession):
        self.session, self.policy = session, session.policy

    @property
    def processed(self) -> int:
        return self.session.processed

    @property
    def kv_tokens(self) -> int:
        return max(t for t, _ in self.session.streams_kv())

    @property
    def kv_bytes(self) -> int:
        return max(b for _, b in self.session.streams_kv())
