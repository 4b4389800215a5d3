"""Meters for one run: per-token latency, tokens/s, memory (process RSS, CUDA allocator, NVML) and
the exact KV-cache tokens and bytes over the stream.

A meter started on a session (`meter.start(session)`) reads what it needs from it: `step()` after
each unit of work (a chunk, a turn, a round) records the tokens the session ran since the last
step, its KV tokens and bytes. The per-step work is a clock read and a few list appends; RSS and
NVML are sampled every `sample_every` steps. On CUDA the clock is read after a synchronize, so
latencies are real.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import psutil

MIB = 1024 * 1024


class _Nvml:
    """Device memory in use as NVML reports it (includes other processes); None without a GPU."""

    def __init__(self, device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
        except Exception:  # NVMLError_LibraryNotFound and friends: no NVML here
            self.handle = None

    def used(self) -> int | None:
        if self.handle is None:
            return None
        return int(self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)


class Meter:
    def __init__(self, device, sample_every: int = 64, curve_points: int = 512):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"
        self.sample_every, self.curve_points = sample_every, curve_points
        self.process = psutil.Process()
        self.nvml = _Nvml(device)
        self.session: Any = None
        self.start()  # a task that never calls start() is measured from here

    def start(self, session: Any = None) -> None:
        """Measure from now (after the task's own preparation); with `session`, measure that
        session: `step()` then reads its tokens run, KV tokens and KV bytes."""
        if session is not None:
            self.session = session
        session = self.session
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.latencies: list[float] = []  # seconds per token, one entry per step
        self.kv_tokens: list[int] = []
        self.fed: list[int] = []  # tokens fed when each kv_tokens entry was taken (chunks: many per step)
        self.kv_bytes_peak = 0
        # physical: every layer at its longest lane's length (differs from kv_bytes only where
        # heads of one layer keep unequal counts; tracked for such policies alone, off the
        # per-token path otherwise)
        self.physical = session is not None and getattr(session.policy, "uneven", False)
        self.kv_physical_peak = 0
        self.rss_peak = self.rss_start = self.process.memory_info().rss
        self.nvml_peak = self.nvml.used()
        self.tokens = 0
        self._processed = self.session.processed if self.session is not None else 0
        # a step counts at least one token, but where a batch's conversations share one count
        # (LanesGauge.shared), a step whose tokens another's step already counted ran none
        self._floor = 0 if getattr(self.session, "shared", False) else 1
        self.t_start = self._last = self._clock()

    def _clock(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self, tokens: int | None = None, kv_tokens: int | None = None, kv_bytes: int | None = None) -> None:
        """One unit of work done: `tokens` it covered (default: what the session ran since the
        last step, at least 1), the KV tokens and bytes held after it (default: the session's)."""
        session = self.session
        if session is not None:
            if tokens is None:
                tokens = max(session.processed - self._processed, self._floor)
            if kv_tokens is None:
                kv_tokens = session.kv_tokens
            if kv_bytes is None:
                kv_bytes = session.kv_bytes
            self._processed = session.processed
        if tokens is None or kv_tokens is None or kv_bytes is None:
            raise TypeError("Meter.step() needs tokens, kv_tokens and kv_bytes unless started on a session")
        now = self._clock()
        if tokens:
            self.latencies.append((now - self._last) / tokens)
        self._last = now
        self.tokens += tokens
        self.kv_tokens.append(kv_tokens)
        self.fed.append(self.tokens)
        if kv_bytes > self.kv_bytes_peak:
            self.kv_bytes_peak = kv_bytes
        if self.physical:
            self.kv_physical_peak = max(self.kv_physical_peak, session.physical_kv_bytes)
        if len(self.latencies) % self.sample_every == 0:
            self._sample()

    def clock(self) -> float:
        """Seconds (after a synchronize on CUDA), for timings outside `step`."""
        return self._clock()

    def rate(self) -> float:
        """Tokens per second over the steps so far."""
        elapsed = self._last - self.t_start
        return self.tokens / elapsed if elapsed > 0 else float("nan")

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside the measured work (e.g. a progress-bar refresh) out of the clock."""
        self._last += seconds

    def _sample(self) -> None:
        rss = self.process.memory_info().rss
        if rss > self.rss_peak:
            self.rss_peak = rss
        used = self.nvml.used()
        if used is not None and (self.nvml_peak is None or used > self.nvml_peak):
            self.nvml_peak = used

    def finish(self, allocated_kv_bytes: int) -> tuple[dict, dict]:
        """Return (metrics, curves)."""
        self._sample()
        elapsed = self._last - self.t_start
        lat = np.asarray(self.latencies) if self.latencies else np.zeros(1)
        metrics = {
            "tokens": self.tokens,
            "seconds": round(elapsed, 4),
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else float("nan"),
            "latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
            "latency_p95_ms": float(np.percentile(lat, 95) * 1e3),
            "rss_peak_mib": self.rss_peak / MIB,
            "rss_growth_mib": (self.rss_peak - self.rss_start) / MIB,
            "kv_tokens_peak": int(max(self.kv_tokens, default=0)),
            "kv_mib_peak": self.kv_bytes_peak / MIB,
            "kv_allocated_mib": allocated_kv_bytes / MIB,
        }
        if self.physical:
            metrics["kv_physical_mib_peak"] = self.kv_physical_peak / MIB
        if self.cuda:
            metrics["cuda_peak_mib"] = self.torch.cuda.max_memory_allocated(self.device) / MIB
        if self.nvml_peak is not None:
            metrics["nvml_used_peak_mib"] = self.nvml_peak / MIB
        kv = subsample(self.kv_tokens, self.curve_points)
        kv["index"] = [self.fed[i] for i in kv["index"]]  # x: tokens fed, not steps (a chunk is one step)
        curves = {"kv_tokens": kv}
        return metrics, curves


def subsample(values, points: int) -> dict:
    """Keep at most `points` (index, value) pairs, evenly spaced, always with the last one."""
    n = len(values)
    if n == 0:
        return {"index": [], "value": []}
    step = max(1, -(-n // points))
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return {"index": idx, "value": [values[i] for i in idx]}


class GroupMeter:
    """The meters of a group's runs (one stream each, engine/session.py `group`): one `step()`
    steps every run's meter with its stream's share of the tokens and its own KV tokens and
    bytes, so each run's tokens/s is the rate its stream advanced at and its KV numbers are its
    own. Tasks call it as a Meter (`rate(b)`: run b's)."""

    def __init__(self, device, runs: int):
        self.meters = [Meter(device) for _ in range(runs)]
        self.session: Any = None

    def start(self, session: Any = None) -> None:
        if session is not None:
            self.session = session
        for meter in self.meters:
            meter.start()
        self._processed = self.session.processed if self.session is not None else 0

    def step(self, tokens: int | None = None) -> None:
        session, runs = self.session, len(self.meters)
        if tokens is None:
            tokens = max(session.processed - self._processed, runs)
        self._processed = session.processed
        share = max(tokens // runs, 1)
        for meter, (kv_tokens, kv_bytes) in zip(self.meters, session.streams_kv()):
            meter.step(share, kv_tokens, kv_bytes)

    def rate(self, run: int = 0) -> float:
        return self.meters[run].rate()

    def clock(self) -> float:
        return self.meters[0].clock()

    def exclude(self, seconds: float) -> None:
        for meter in self.meters:
            meter.exclude(seconds)

    def finish(self, run: int, allocated_kv_bytes: int) -> tuple[dict, dict]:
        return self.meters[run].finish(allocated_kv_bytes)
