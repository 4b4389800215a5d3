"""Static-shape decode, replayed as a CUDA graph: one token per stream per step.

Eager transformers decode on a GPU is launch-bound: a 135M or 8B model spends ~20 ms per token
in Python and kernel launches for ~2-5 ms of GPU work. A CUDA graph replays the whole forward as
one launch, but needs fixed shapes and addresses. The engine already keeps them: its buffers are
preallocated and valid tokens always fill slots [0, n). So the graphed step attends over the whole
capacity with a mask (slots > n masked out; the new token is written at slot n through a device
index), positions come from a device buffer, and eviction and re-rotation keep happening in place
between replays. The graph is captured again only when the capacity grows (dense).

`capture=False` runs the same static-shape forward eagerly: the tests prove on CPU that it gives
the ordinary path's logits.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import TYPE_CHECKING

import torch

from streambench.errors import ConfigError

if TYPE_CHECKING:
    from streambench.engine.cache import StreamCache
    from streambench.policies.base import CachePolicy

log = logging.getLogger("streambench")

DECODES = ("eager", "static", "graph")


def decode_mode(requested: str, policy: CachePolicy, cache: StreamCache | None, device: torch.device) -> str:
    """How one-token steps run. "graph": replayed as a CUDA graph; "static": the same
    static-shape forward run eagerly (what the tests check on CPU); "eager": plain transformers
    forwards. Asked for, it is granted where the cache is one single-device buffer without
    sliding layers and the policy neither captures attention nor retrieves (both work in Python
    between layers); "graph" on a CPU is refused."""
    from streambench.engine.observe import EAGER_ONLY

    if requested not in DECODES:
        raise ConfigError(f"decode must be eager, static or graph, got {requested!r}")
    if requested == "eager" or cache is None or cache.spread or cache.sliding is not None:
        return "eager"  # (no cache: recompute-window; a model spread over GPUs, or with sliding layers)
    if policy.observes & EAGER_ONLY:
        log.info("%s observes attention in Python: decoding eagerly, not with decode=%s", policy.name, requested)
        return "eager"
    if policy.retrieves or policy.uneven:  # retrieval taps queries in Python; pads are masked there
        return "eager"
    if cache.quant is not None:  # dequantizes what it holds as each layer reads it
        return "eager"
    if requested == "graph" and device.type != "cuda":
        raise ConfigError("CUDA graphs need a CUDA device")
    return requested


class StaticDecoder:
    def __init__(self, session, capture: bool = True):
        self._session = weakref.ref(session)  # no cycle: a finished session frees its graph pool at once
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capacity = -1
        self.replays = 0

    @property
    def session(self):
        return self._session()

    def _buffers(self) -> None:
        s, cache = self.session, self.session.cache
        dtype = s.dtype if s.dtype.is_floating_point else torch.float32
        self.ids = torch.zeros(s.batch, 1, dtype=torch.long, device=s.device)
        self.positions = torch.zeros(s.batch, 1, dtype=torch.long, device=s.device)
        self.blocked = torch.finfo(dtype).min
        self.mask = torch.full((s.batch, 1, 1, cache.capacity), self.blocked, dtype=dtype, device=s.device)
        self.open = 0  # the mask lets the query see slots [0, open)
        self.capacity = cache.capacity

    def _forward(self) -> torch.Tensor:
        cache = self.session.cache
        cache.static = True
        try:
            return self.session.model(
                input_ids=self.ids, position_ids=self.positions, attention_mask=self.mask, cache=cache, use_cache=True
            ).logits
        finally:
            cache.static = False

    def _prepare(self, ids: torch.Tensor) -> None:
        cache = self.session.cache
        n = cache.length
        self.ids.copy_(ids)
        self.positions.copy_(cache.next_positions(1))
        if n + 1 > self.open:  # one slot more per step, or none: touch only the slots that changed
            self.mask[..., self.open : n + 1] = 0
        elif n + 1 < self.open:  # after an eviction or a rollback
            self.mask[..., n + 1 : self.open] = self.blocked
        self.open = n + 1
        cache.set_write_slot(n)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, vocab) of one token per stream; the caller commits it to the cache."""
        cache = self.session.cache
        if cache.length + 1 > cache.capacity:
            cache.grow(cache.length + 1)
        if self.capacity != cache.capacity:
            self._buffers()
            self.graph = None
        self._prepare(ids)
        if not self.capture:
            return self._forward()
        if self.graph is None:
            try:
                self._capture()
            except Exception as exc:  # a model whose forward cannot be captured: eager from now on
                warnings.warn(
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); decoding eagerly", stacklevel=2
                )
                self.graph = None
                self.session.drop_static_decoder()
                return self._forward()
        graph = self.graph
        if graph is None:  # (the capture above failed: eager from now on)
            return self._forward()
        graph.replay()
        self.replays += 1
        return self.logits.clone()

    def _capture(self) -> None:
        device = self.ids.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up, as torch.cuda.graphs asks (writes slot n, as the step will)
                self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward()
        self.graph = graph
