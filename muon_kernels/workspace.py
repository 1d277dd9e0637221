"""Work buffers: those the kernel backends take fresh each call (and the debug switch that poisons
them), and ``Scratch``, the one way a buffer is kept and reused from call to call; the split
products' arrival counters (``COUNTERS``), kept per stream; and ``on_device``, the device a call's
launches go to.

``MUON_KERNELS_DEBUG_FILL=nan`` fills every buffer the Triton and CUDA backends take from
``torch.empty`` with NaN, so a kernel that reads an element nobody wrote (the "padding holds
zeros" contract of the CUDA buffers, a stack slot a fused kernel missed) fails loudly instead of
passing by luck of zeroed fresh memory. The GPU tests and ``make gpu-check`` run with it; it costs
one fill per buffer, so it is off by default. Read on every call, so a test can switch it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .environment import Switch

FILL_VARIABLE = "MUON_KERNELS_DEBUG_FILL"
_FILL = Switch(FILL_VARIABLE)


def fill_value() -> float | None:
    value = _FILL.get()
    if value in ("", "0", "off"):
        return None
    if value != "nan":
        raise ValueError(f"{FILL_VARIABLE} must be 'nan' (or unset), got {value!r}")
    return float("nan")


# Called with every buffer ``empty`` hands out (triton_kernels.replay records a call's buffers).
observers: list[Callable[[torch.Tensor], None]] = []


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or NaN-filled under ``MUON_KERNELS_DEBUG_FILL=nan`` (floating dtypes)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    for observe in observers:
        observe(out)
    return poisoned(out)


def poisoned(out: torch.Tensor) -> torch.Tensor:
    """``out``, NaN-filled first under ``MUON_KERNELS_DEBUG_FILL=nan`` (floating dtypes): for a work
    buffer handed out again, so the switch checks every use of it, not only the first."""
    fill = fill_value()
    if fill is not None and out.is_floating_point():
        out.fill_(fill)
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, dtype=t.dtype, device=t.device)


def reinterpret(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A contiguous ``shape`` tensor of ``dtype`` over the memory of contiguous ``t`` (from its first
    byte), where it fits: a dead tensor's memory as a work buffer; else None. Views only (no
    allocation, so a recorded call sees none: triton_kernels/replay.py)."""
    size = math.prod(shape) * dtype.itemsize
    if not t.is_contiguous() or size > t.numel() * t.element_size():
        return None
    return t.view(-1).view(torch.uint8).narrow(0, 0, size).view(dtype).view(shape)


class Scratch:
    """Named work buffers reused from call to call by whoever keeps this object (a CPU bucket, a
    thread, one call's chunks): each name is one allocation that only grows, handed out whole when
    the shape matches (the same tensor every time) and as a view of its first elements otherwise. On a CPU a fresh large buffer is a fresh mmap whose page faults cost
    more than the arithmetic that fills it (GPUs have the caching allocator). A buffer asked for
    under inference mode is not kept: a tensor made there cannot be written outside it."""

    def __init__(self, device: torch.device):
        self.device, self.buffers = device, {}

    def __call__(self, name, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        buf = self.buffers.get(name)
        if buf is not None and buf.dtype == dtype and tuple(buf.shape) == shape:
            return buf  # the same tensor every time: a compiled step sees one input, not a fresh view
        n = math.prod(shape)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            # Not asked while torch.compile traces: traced, the inference-mode query changed a
            # compiled step's results (tests/test_structure.py::test_compiled_step_matches_eager).
            if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
                self.buffers[name] = buf
            return buf
        return buf.view(-1)[:n].view(shape)


class ArrivalCounters:
    """Arrival counters: per tile of a split product (the Triton symmetric kernel and the CUDA
    extension's both sum their K slices in the same launch) and per matrix of the Triton
    normalization (its last tile reduces the matrix's partials): int32 zeros that every launch leaves
    at zero again (the last arrival resets its counter), so one array serves every launch that is
    ordered after the previous one — the launches of one stream. Kept per (device, stream):
    launches on two streams may run at once and must not count into the same counters. Under CUDA
    graph capture each launch gets fresh zeros instead (the zeroing is captured with it and redone
    on every replay; the array belongs to the graph's memory pool), so a graph never shares
    counters with eager launches or with another graph, whichever stream replays it."""

    MIN_SIZE = 1024  # counters: more tiles than any product the split rule splits on today's GPUs (< 2 waves)

    def __init__(self):
        self.by_stream: dict[tuple, torch.Tensor] = {}
        self.forgotten = 0  # arrays dropped so far: a recorded call (triton_kernels.replay) holding one re-records

    def get(self, device: torch.device, tiles: int) -> torch.Tensor:
        if device.type != "cuda":  # the CPU interpreter runs programs one by one: one array per device
            return self.kept((device, None), device, tiles)
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(tiles, dtype=torch.int32, device=device)
        # The stream of the launch: the device's current stream (Triton launches there, the callers
        # making X's device the current one; the CUDA backend passes the extension that stream).
        # Keyed by X's device, where the array is allocated, so an array is never handed to a
        # launch on another device. The key is the raw handle: a stream destroyed with
        # work still queued and a new one given its handle would share an array (torch's pooled
        # streams are never destroyed; synchronize an external stream before destroying it).
        index = device.index if device.index is not None else torch.cuda.current_device()
        return self.kept((index, torch._C._cuda_getCurrentRawStream(index)), device, tiles)

    def forget(self, counters: torch.Tensor) -> None:
        """Drop a kept array whose launch raised (an interrupted interpreter run, a failed launch):
        some of its counters may not be back at zero, and a later launch would misread them."""
        self.by_stream = {k: v for k, v in self.by_stream.items() if v is not counters}
        self.forgotten += 1

    def kept(self, key: tuple, device: torch.device, tiles: int) -> torch.Tensor:
        counters = self.by_stream.get(key)
        if counters is None or counters.numel() < tiles:
            # A bigger array replaces a smaller one: the old one is freed in stream order, after
            # the launches already enqueued on this stream that use it. Made outside any dispatch
            # mode: it outlives the call, and a call being recorded (triton_kernels.replay) holds
            # it as a kept tensor rather than failing at its zeroing.
            with _disable_current_modes():
                counters = torch.zeros(max(tiles, self.MIN_SIZE), dtype=torch.int32, device=device)
            self.by_stream[key] = counters
        return counters


COUNTERS = ArrivalCounters()


def on_device(device: torch.device):
    """A context making ``device`` the current CUDA device where it is not already. Triton's dispatch,
    the direct launches and replay (triton_kernels/) and a graph capture go to the current device's
    current stream, so a call on tensors of another GPU (``model.to("cuda:1")`` without
    ``torch.cuda.set_device(1)``) would otherwise launch on device 0 with device 1's addresses;
    torch's own ops guard themselves by their tensors' device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
