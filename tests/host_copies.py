"""A trap for host-to-device copies in steady-state optimizer steps, usable without a GPU.

On a GPU every tensor built from host data (``torch.tensor(list)``, ``torch.as_tensor`` of numbers,
``from_numpy``) and then moved to the device is a pageable host-to-device copy: a sync point per
step, and an error inside CUDA-graph capture. On the CPU those calls are the same code paths, so
trapping them there finds a per-step copy before any GPU does. Inside the trap
``torch.cuda.is_current_stream_capturing()`` also answers True, so code that refuses to build a
table during capture is exercised too.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


class HostCopy(AssertionError):
    pass


@contextlib.contextmanager
def no_host_to_device_copies():
    real_as_tensor, real_to = torch.as_tensor, torch.Tensor.to

    def tensor(*args, **kwargs):
        raise HostCopy(f"torch.tensor({args[0] if args else ''!r}) in a steady-state step (a host-to-device copy on a GPU)")

    def as_tensor(data, *args, **kwargs):
        if not isinstance(data, torch.Tensor):
            raise HostCopy(f"torch.as_tensor({data!r}) in a steady-state step (a host-to-device copy on a GPU)")
        return real_as_tensor(data, *args, **kwargs)

    def from_numpy(array):
        raise HostCopy("torch.from_numpy in a steady-state step (a host-to-device copy on a GPU)")

    def to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device != self.device:
            raise HostCopy(f"Tensor.to moved a tensor {self.device} → {out.device} in a steady-state step")
        return out

    with mock.patch.object(torch, "tensor", tensor), mock.patch.object(torch, "as_tensor", as_tensor), \
            mock.patch.object(torch, "from_numpy", from_numpy), mock.patch.object(torch.Tensor, "to", to), \
            mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True):
        yield
