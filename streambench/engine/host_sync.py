"""Counting what makes the host wait for the device, on any device (a CPU included).

On a GPU a decode step that reads a device value on the host (`.item()`, `.cpu()`, a boolean
index, whose output shape is data) waits for every kernel queued before it; a step without one can
be queued ahead, and captured whole as a CUDA graph. `torch.cuda.set_sync_debug_mode` finds them on
a GPU only; this counter finds the same calls on a CPU, where they cost nothing and so hide:

- scalars read on the host: `aten._local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`), and
  `aten.equal` / `aten.is_nonzero`;
- data-dependent shapes: `aten.nonzero`, `masked_select`, `unique`, boolean indexing,
  `repeat_interleave` without its output size;
- host copies: `Tensor.numpy()`, `.tolist()`, `.cpu()`, `__array__` (numpy reading a tensor),
  which do not pass the dispatcher and are wrapped for the duration.

tests/engine/test_device_steps.py asserts a content-aware policy's full-cache step counts none.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_SCALARS = {_aten._local_scalar_dense.default, _aten.equal.default, _aten.is_nonzero.default}
_SHAPES = {
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
}
_HOST_COPIES = ("numpy", "tolist", "cpu", "__array__")


def _syncs(func, args, kwargs) -> bool:
    if func in _SCALARS or func in _SHAPES:
        return True
    if func is _aten.index.Tensor:  # a boolean index: its output's length is the count of True
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype == torch.bool for i in indices)
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return False


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as syncs: ...`; then `syncs.count` and `syncs.where` (the
    streambench line each came from: what a failing test prints)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def _note(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "streambench" in f.filename and __file__ != f.filename]
        at = f"{frames[-1].filename.split('streambench/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.where[f"{what} at {at}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self._note(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in _HOST_COPIES:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapped(tensor, *args, _name=name, _original=original, **kwargs):
                self._note(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        return super().__exit__(*exc)
