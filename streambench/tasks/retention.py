"""What the cache keeps of what must be remembered: tagged fact tokens, retention and cache maps.

SirLLM's claim (Yao et al. 2024, Sec. 3) is about the cache, not the answer: the user's key
tokens (high token entropy) survive eviction longer than StreamingLLM's recency keeps them. That
is measurable on any model, however weak its answers: tasks tag the tokens that carry a fact
(grocery's requested item, RPS's revealed moves, the needle), and at every user turn
`Retention` records, for each tagged token, the share of (layer, KV head) lanes whose cache still
holds it, binned by the token's age in turns and in tokens. `CacheMap` keeps a subsampled record
of which original positions the cache holds over the first stream of a run, for the report's
cache-map plot (a band and the sink line for StreamingLLM, scattered tokens for SirLLM,
retrieved blocks for longmem).
"""

from __future__ import annotations

import numpy as np

TOKEN_BIN = 16  # tokens per bin of the retention-by-age curve (merged to <= CURVE_POINTS at the end)
CURVE_POINTS = 256
MAP_SAMPLES = 64  # columns of a cache map
MAP_ROWS = 256  # rows (original-position bins) a map column is stored in


def kept_share(held: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For each stream position in `positions`: the share of lanes holding it. `held` is (n,)
    (one keep-set everywhere: 0 or 1) or (L, H, n) (per layer and head: a fraction)."""
    positions = np.asarray(positions, dtype=np.int64)
    if held.ndim == 1:
        return np.isin(positions, held).astype(np.float64)
    lanes = held.shape[0] * held.shape[1]
    values, counts = np.unique(held, return_counts=True)
    at = np.searchsorted(values, positions)
    at = np.minimum(at, max(len(values) - 1, 0))
    found = (values[at] == positions) if len(values) else np.zeros(len(positions), bool)
    return np.where(found, counts[at] / lanes, 0.0)


def tokens_of(tokenizer, text: str, span: tuple[int, int], ids: list[int] | None = None) -> list[int]:
    """Indices of the tokens of `tokenizer(text)` (no special tokens) that overlap characters
    span[0]:span[1] of `text`: from the fast tokenizer's offsets, else from decoded prefixes."""
    start, stop = span
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        offsets = None
    if offsets is None:
        ids = ids if ids is not None else tokenizer(text, add_special_tokens=False)["input_ids"]
        ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
        offsets = list(zip([0] + ends[:-1], ends))
    return [i for i, (a, b) in enumerate(offsets) if a < stop and b > start and b > a]


class Retention:
    """Tagged fact tokens of the current stream and, over every stream of a run, the share of
    them still cached against their age. `tag` when a fact enters the stream, `sample` at each
    point a fact may be asked for (a user turn, the needle's question)."""

    def __init__(self):
        self._by_turn = np.zeros((2, 0))  # rows: sum of shares, count; column: age in turns
        self._by_token = np.zeros((2, 0))  # column: age // TOKEN_BIN
        self.reset()

    def reset(self) -> None:
        """A new stream: its positions start again at 0."""
        self.positions = np.zeros(0, dtype=np.int64)
        self.turn_of = np.zeros(0, dtype=np.int64)
        self.fact_of = np.zeros(0, dtype=np.int64)
        self.facts: list[str] = []  # fact names, index = fact id
        self.last: np.ndarray = np.zeros(0)  # share per tagged token at the last sample

    def tag(self, name: str, positions, turn: int) -> None:
        positions = np.asarray(positions, dtype=np.int64)
        self.facts.append(name)
        self.positions = np.concatenate([self.positions, positions])
        self.turn_of = np.concatenate([self.turn_of, np.full(len(positions), turn)])
        self.fact_of = np.concatenate([self.fact_of, np.full(len(positions), len(self.facts) - 1)])

    def sample(self, held: np.ndarray, fed: int, turn: int) -> None:
        """Share of lanes holding each tagged token now (`fed` tokens into the stream, turn
        `turn`), added to the retention curves by age. Tokens fed at this turn are not counted."""
        old = self.turn_of < turn
        self.last = kept_share(held, self.positions)
        if not old.any():
            return
        shares = self.last[old]
        self._by_turn = _accumulate(self._by_turn, turn - self.turn_of[old], shares)
        self._by_token = _accumulate(self._by_token, (fed - self.positions[old]) // TOKEN_BIN, shares)

    def absorb(self, other: Retention) -> None:
        """Add `other`'s samples to these curves (conversations of one run played on other streams)."""
        for name in ("_by_turn", "_by_token"):
            mine, theirs = getattr(self, name), getattr(other, name)
            size = max(mine.shape[1], theirs.shape[1])
            merged = np.pad(mine, ((0, 0), (0, size - mine.shape[1])))
            merged[:, : theirs.shape[1]] += theirs
            setattr(self, name, merged)

    def share(self, name: str) -> float:
        """Mean share of the fact's tokens cached at the last sample (1.0: every token in every lane)."""
        fact = self.facts.index(name)
        values = self.last[self.fact_of == fact]
        return float(values.mean()) if len(values) else float("nan")

    def shares(self) -> np.ndarray:
        """Per fact of this stream: the mean share of its tokens at the last sample."""
        counts = np.bincount(self.fact_of, minlength=len(self.facts))
        return np.bincount(self.fact_of, self.last, minlength=len(self.facts)) / np.maximum(counts, 1)

    def curves(self) -> dict:
        out = {}
        for key, acc, width in (
            ("retention_by_turns", self._by_turn, 1),
            ("retention_by_tokens", self._by_token, TOKEN_BIN),
        ):
            seen = np.flatnonzero(acc[1])
            if not len(seen):
                continue
            acc = acc[:, : int(seen[-1]) + 1]  # (the ages seen: not the buffer's doubling)
            merge = max(1, -(-acc.shape[1] // CURVE_POINTS))
            if merge > 1:
                pad = (-acc.shape[1]) % merge
                acc = np.pad(acc, ((0, 0), (0, pad))).reshape(2, -1, merge).sum(-1)
                seen = np.flatnonzero(acc[1])
            out[key] = {
                "index": (seen * width * merge).tolist(),
                "value": np.round(acc[0, seen] / acc[1, seen], 4).tolist(),
                "count": acc[1, seen].astype(int).tolist(),
                "bin": width * merge,
            }
        return out


def _accumulate(acc: np.ndarray, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    size = int(index.max()) + 1
    if size > acc.shape[1]:
        acc = np.pad(acc, ((0, 0), (0, max(size, 2 * acc.shape[1]) - acc.shape[1])))
    acc[0, :size] += np.bincount(index, weights, minlength=size)
    acc[1, :size] += np.bincount(index, minlength=size)
    return acc


class CacheMap:
    """Which original positions the cache holds over the first stream of a run, subsampled:
    every call is kept until MAP_SAMPLES columns, then every other one and twice as sparse
    from then on. A column stores, per original-position bin, the largest share of lanes
    holding a token of the bin (so four sink tokens stay visible in a bin of 64)."""

    def __init__(self):
        self.columns: list[tuple[int, np.ndarray, np.ndarray]] = []  # (tokens fed, positions held, share of lanes)
        self.every, self.calls, self.done = 1, 0, False
        self.facts: list[tuple[int, int]] = []  # [start, stop) of tagged tokens, for the plot

    def end_stream(self) -> None:
        """The first stream has ended: the map is of it alone."""
        if self.columns:
            self.done = True

    def record(self, held: np.ndarray, fed: int) -> None:
        if self.done:
            return
        self.calls += 1
        if self.calls % self.every:
            return
        flat = np.unique(held)
        flat = flat[flat >= 0]  # (-1: the pads of lanes keeping fewer tokens than others)
        self.columns.append((fed, flat, kept_share(held, flat)))
        if len(self.columns) >= 2 * MAP_SAMPLES:
            self.columns = self.columns[1::2]
            self.every *= 2

    def tag(self, positions) -> None:
        if not self.done and len(positions):
            positions = np.asarray(positions)
            self.facts.append((int(positions.min()), int(positions.max()) + 1))

    def curve(self) -> dict | None:
        """Sparse columns: per column the occupied position bins and their largest share."""
        if not self.columns:
            return None
        columns = self.columns[:: -(-len(self.columns) // MAP_SAMPLES)]
        top = max(fed for fed, _, _ in columns)
        width = max(1, -(-top // MAP_ROWS))
        out = []
        for _fed, flat, share in columns:
            rows = flat // width
            cells = np.zeros(int(rows.max()) + 1 if len(rows) else 0)
            np.maximum.at(cells, rows, share)
            occupied = np.flatnonzero(cells)
            out.append({"rows": occupied.tolist(), "share": np.round(cells[occupied], 2).tolist()})
        return {"fed": [fed for fed, _, _ in columns], "bin": width, "columns": out, "facts": self.facts[:256]}


class LaneMap:
    """Where the budget went, lane by lane, when a fact is asked for: the tokens each (layer, KV
    head) lane keeps and the share of the tagged fact tokens it still holds, averaged over the
    samples of a run. Uneven policies (pyramidkv, adakv, duo) differ here; for the others every
    lane keeps as many, and the fact map says which heads kept the fact."""

    def __init__(self):
        self.counts: np.ndarray | None = None  # (L, H) sums over samples
        self.facts: np.ndarray | None = None
        self.samples = 0

    def sample(self, held: np.ndarray, layers: int, heads: int, facts: np.ndarray) -> None:
        """`held`: the session's held positions, (n,) or (L, H, n) with -1 at pads."""
        lanes = np.broadcast_to(held, (layers, heads, held.shape[-1]))
        counts = (lanes >= 0).sum(-1).astype(np.float64)
        share = np.isin(lanes, np.asarray(facts)).sum(-1) / max(len(facts), 1)
        if self.counts is None or self.facts is None:
            self.counts, self.facts = counts, share
        else:
            self.counts += counts
            self.facts += share
        self.samples += 1

    def curve(self) -> dict | None:
        if not self.samples or self.counts is None or self.facts is None:
            return None
        return {
            "counts": np.round(self.counts / self.samples, 2).tolist(),
            "facts": np.round(self.facts / self.samples, 3).tolist(),
            "samples": self.samples,
        }
