"""Which tensors are alive while a block runs, and the most at once: ``LiveTensors``.

A tensor is tracked from the op (or ``workspace.empty``) that allocates its storage until CPython
frees that storage — on a CPU exactly when the last tensor or view of it goes. Storages that
existed before the block (parameters, the input stack) are not counted. Inside a custom op a
dispatch mode sees nothing, so the buffers the kernel backends take from ``workspace.empty`` are
reported by that function's observers instead; each storage counts once either way.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from muon_kernels import workspace


class LiveTensors(TorchDispatchMode):
    """``peak_bytes``: the most bytes of tracked storages alive at once; ``peak_count[(shape,
    dtype)]``: the most tensors of that shape and dtype alive at once (by the tensor that allocated
    the storage)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, tuple]] = {}  # storage address -> (bytes, (shape, dtype))
        self.bytes = self.peak_bytes = 0
        self.count: Counter = Counter()
        self.peak_count: Counter = Counter()

    def __enter__(self):
        workspace.observers.append(self.track)
        return super().__enter__()

    def __exit__(self, *exc):
        workspace.observers.remove(self.track)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            given = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            for t in _tensors(out):
                if t.untyped_storage().data_ptr() not in given:  # not in place, not out=
                    self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in self.live or storage.nbytes() == 0:
            return
        key = (tuple(t.shape), t.dtype)
        self.live[address] = (storage.nbytes(), key)
        self.bytes += storage.nbytes()
        self.count[key] += 1
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self.peak_count[key] = max(self.peak_count[key], self.count[key])
        weakref.finalize(storage, self._freed, address)  # torch keeps one Python object per storage

    def _freed(self, address: int) -> None:
        size, key = self.live.pop(address)
        self.bytes -= size
        self.count[key] -= 1


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
