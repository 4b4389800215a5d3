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
  which do not pass the dispatcher and are wrapped for the duration;
- host data entering (`uploads`, counted apart): `torch.from_numpy`, `torch.tensor`,
  `torch.as_tensor` of host data, and a factory (`arange`, `zeros`, ...) called without a device.
  On a GPU such a tensor is copied to the device, and PyTorch's blocking host-to-device copy
  synchronizes the stream (`memcpy_and_sync`): the host waits as it does for `.item()`.

tests/engine/test_device_steps.py asserts a content-aware policy's full-cache step counts none.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
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
_FACTORIES = {
    torch.arange,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.eye,
    torch.linspace,
    torch.randperm,
    torch.rand,
    torch.randn,
    torch.randint,
}
_UPLOADS = ("from_numpy", "tensor", "as_tensor")


class _Factories(TorchFunctionMode):
    """Factories called without a device: on a GPU, host tensors copied up afterwards."""

    def __init__(self, note) -> None:
        super().__init__()
        self.note = note

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            self.note(f"{func.__name__} on the host")
        return func(*args, **kwargs)


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
        self.where: collections.Counter[str] = collections.Counter()  # device values read on the host
        self.uploads: collections.Counter[str] = collections.Counter()  # host data made into tensors
        self._saved: dict[str, object] = {}
        self._saved_torch: dict[str, object] = {}
        self._factories = _Factories(self._upload)

    @property
    def count(self) -> int:
        return sum(self.where.values())

    @property
    def upload_count(self) -> int:
        return sum(self.uploads.values())

    @staticmethod
    def _site() -> str:
        frames = [
            f
            for f in traceback.extract_stack()[:-3]
            if "streambench/" in f.filename and not f.filename.endswith("host_sync.py")
        ]
        return f"{frames[-1].filename.split('streambench/')[-1]}:{frames[-1].lineno}" if frames else "?"

    def _note(self, what: str) -> None:
        self.where[f"{what} at {self._site()}"] += 1

    def _upload(self, what: str) -> None:
        self.uploads[f"{what} at {self._site()}"] += 1

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
        for name in _UPLOADS:
            original = getattr(torch, name)
            self._saved_torch[name] = original

            def made(data, *args, _name=name, _original=original, **kwargs):
                if not isinstance(data, torch.Tensor):
                    self._upload(f"torch.{_name}")
                return _original(data, *args, **kwargs)

            setattr(torch, name, made)
        self._factories.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._factories.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        for name, original in self._saved_torch.items():
            setattr(torch, name, original)
        self._saved, self._saved_torch = {}, {}
        return result
