"""Replayed launch sequences: a Newton–Schulz call's launches, recorded once per call signature
and replayed with fresh buffers, without the Python that chose them.

Why: a batch-1 call at a skinny shape is host-bound. At 1024×4096 a call makes 17 launches of a
few to ~25 µs of GPU work each, and the host spends ~12 µs of Python per launch choosing them —
the product wrappers (configs, grids, split factors, work buffers), the direct launcher's key and
Triton's runner — plus the C launcher's driver query for every tensor argument. None of that
depends on the values in the stack: for a given (shape, strides, dtype, alignment, config, device,
stream) the call makes the same launches with the same scalars, and only the buffers' addresses
change. So the first such call is recorded — its work buffers (``workspace.empty``) in order and
each launch's compiled kernel, grid and arguments, every tensor argument resolved to (buffer,
byte offset) — and later calls allocate the same buffers and hand each compiled kernel's C
launcher the new addresses as integers (which also skips its per-pointer driver query).

A recording is kept only if the call did nothing else: every launch went through the direct path
(``launch``: a first launch compiles through Triton's dispatch, a TMA descriptor always does), and
no torch operation other than allocations and views ran (a ``TorchDispatchMode`` watches; the
cuBLAS paths' ``bmm`` disqualifies them). A signature that fails ``ATTEMPTS`` recordings in a row
is left to the plain path. Replay is off (the plain path runs) under the interpreter, during CUDA
graph capture (split products need fresh arrival counters there), with ``MUON_KERNELS_DEBUG_FILL``
(every buffer must be poisoned), opt-in autotuning, a forced config (bench/tune.py), direct
launches off, or ``MUON_KERNELS_REPLAY=0``. Launch hooks get what Triton's runner gives them (no
kernel here defines ``launch_metadata``, so no hook sees a tensor argument either way). Several
threads recording at once spoil each other's recordings (the observers are global): their calls
then stay on the plain path. Tensors a launch reads that the call did not allocate (the per-stream
arrival counters of the normalization and the split products) are held by the recording and passed
as they were. A result in the
memory of a stack the caller gave up (``consume``: newton_schulz.consumed) is rebuilt over the new
stack's.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton import knobs
from triton.runtime.driver import driver

from .. import workspace
from ..environment import Switch, Toggle
from . import autotune, config, launch
from .symmetric_matmul import COUNTERS

ENV = "MUON_KERNELS_REPLAY"
_SWITCH = Switch(ENV)
ATTEMPTS = 2  # failed recordings in a row before a signature is left to the plain path
MAX_PLANS = 4096  # signatures kept: a program that keeps making new shapes stops recording them

_plans: dict[tuple, "_Plan"] = {}
_failures: dict[tuple, int] = {}
_recording = False
_ENABLED = Toggle(True)


class _Plan:
    """One recorded call: its buffers (shape, dtype) in allocation order; its launches, each with
    the buffers to allocate before it and to let go after it (the plain call's lifetimes, so the
    caching allocator can hand a dead buffer's memory to a later one as it did there: the peak
    stays the plain call's); where its result lives; and the tensors its launches read that it
    did not allocate."""

    __slots__ = ("buffers", "device", "launches", "trailing", "output", "kept", "counters_forgotten")

    def __init__(self, buffers, device, launches, trailing, output, kept):
        self.buffers, self.device, self.launches, self.trailing = buffers, device, launches, trailing
        self.output, self.kept = output, kept
        self.counters_forgotten = COUNTERS.forgotten

    def _allocate(self, made: list, bases: list, which) -> None:
        for i in which:
            shape, dtype = self.buffers[i - 1]
            made[i] = torch.empty(shape, dtype=dtype, device=self.device)
            bases[i] = made[i].data_ptr()

    def replay(self, stack: torch.Tensor, stream: int) -> torch.Tensor:
        made: list = [stack] + [None] * len(self.buffers)  # index 0: the input, i: buffer i - 1
        bases = [stack.data_ptr()] + [0] * len(self.buffers)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        # The hooks are HookChains (Triton 3.6+; a function or None before): launch metadata only
        # where a hook will read it (Triton's runner builds it for empty chains too, ~1 µs a launch).
        hooked = any(h is not None and bool(getattr(h, "calls", True)) for h in (enter, leave))
        for compiled, grid, template, fills, allocate, release in self.launches:
            self._allocate(made, bases, allocate)
            args = list(template)
            for position, source, offset in fills:
                args[position] = bases[source] + offset
            metadata = compiled.launch_metadata(grid, stream, *args) if hooked else None
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata,
                         enter, leave, *args)
            for i in release:  # its memory goes back to the allocator, reusable in this stream's order
                made[i] = None
        self._allocate(made, bases, self.trailing)
        source, whole, shape, stride, offset, dtype = self.output
        if whole:
            return made[source]
        if dtype is None:
            return made[source].as_strided(shape, stride, offset)
        # another dtype over the start of the memory (a consumed stack's: newton_schulz.consumed)
        return workspace.reinterpret(made[source], dtype, shape)


class _Recording(TorchDispatchMode):
    """Collects a call's buffers and launches; ``valid`` drops to False at anything else it does.
    It keeps no buffer alive (only each one's span, shape, strides and dtype), so the recording
    call frees its buffers when the plain call would: each launch's tensors are resolved to
    (buffer, offset) as it is made."""

    def __init__(self, stack: torch.Tensor):
        super().__init__()
        self.spans = [_span(stack)]  # index 0: the input, i: buffer i - 1
        self.buffers: list[tuple] = []  # per buffer: (shape, strides, dtype)
        self.launches: list = []  # (compiled, grid, template, fills, buffers allocated before it)
        self.kept: list[torch.Tensor] = []
        self.allocations = 0
        self.valid = True
        self.thread = threading.get_ident()  # the observers are global: another thread's launch spoils it

    def allocated(self, buffer: torch.Tensor) -> None:
        if threading.get_ident() != self.thread:
            self.valid = False
        self.spans.append(_span(buffer))
        self.buffers.append((tuple(buffer.shape), buffer.stride(), buffer.dtype))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _ALLOCATIONS:
            self.allocations += 1
        elif not func.is_view:
            self.valid = False
        return func(*args, **(kwargs or {}))

    def launched(self, record) -> None:
        if record is None or threading.get_ident() != self.thread:  # None: through Triton's dispatch (a
            self.valid = False  # compile, or an argument it must bind itself)
            return
        compiled, grid, args, tail = record
        template = [*args, *tail]
        fills = []
        for position, value in enumerate(template):
            if not isinstance(value, torch.Tensor):
                continue
            found = _locate(self.spans, len(self.buffers), value.data_ptr())
            if found is None:  # not this call's: kept alive by the plan, passed as it was
                self.kept.append(value)
                template[position] = value.data_ptr()
            else:
                fills.append((position, *found))
                template[position] = 0
        self.launches.append((compiled, grid, tuple(template), tuple(fills), len(self.buffers)))

    def plan(self, stack: torch.Tensor, out: torch.Tensor) -> _Plan | None:
        if self.allocations != len(self.buffers):  # something allocated outside workspace.empty
            return None
        found = _locate(self.spans, len(self.buffers), out.data_ptr())
        if found is None:
            return None
        source, offset = found
        shape, stride, dtype = (tuple(stack.shape), stack.stride(), stack.dtype) if source == 0 \
            else self.buffers[source - 1]
        whole = offset == 0 and tuple(out.shape) == shape and out.stride() == stride and out.dtype == dtype
        if whole:
            output = (source, True, None, None, 0, None)
        elif out.dtype != dtype:  # a consumed stack's memory as another dtype (newton_schulz.consumed)
            if source or offset or not out.is_contiguous() or workspace.reinterpret(stack, out.dtype, out.shape) is None:
                return None
            output = (0, False, tuple(out.shape), None, 0, out.dtype)
        elif offset % out.element_size() or source == 0:
            return None  # (a view into the input would need its storage offset: no call returns one)
        else:
            output = (source, False, tuple(out.shape), out.stride(), offset // out.element_size(), None)
        # Lifetimes: buffer i is allocated before the first launch recorded after its allocation and
        # let go after the last launch that uses it; one no launch uses and that is not the result
        # is never allocated.
        last = {i: j for j, launch in enumerate(self.launches) for _, i, _ in launch[3] if i}
        if source:
            last[source] = len(self.launches)
        first = {i: next((j for j, launch in enumerate(self.launches) if launch[4] >= i), len(self.launches))
                 for i in last}
        launches = [(*launch[:4], tuple(i for i in sorted(first) if first[i] == j),
                     tuple(i for i in sorted(last) if last[i] == j)) for j, launch in enumerate(self.launches)]
        trailing = tuple(i for i in sorted(first) if first[i] == len(launches))
        return _Plan([(shape, dtype) for shape, _, dtype in self.buffers], stack.device, launches, trailing,
                     output, self.kept)


_ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte address ``t`` covers (its base pointer and the end of its extent)."""
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size() - 1


def _locate(spans, allocated: int, address: int) -> tuple[int, int] | None:
    """(index of the span holding ``address``, byte offset into it): the latest of the first
    ``allocated`` buffers that holds it (an earlier one at the same address was freed before the
    later one took its memory), else the input (index 0)."""
    for i in (*range(allocated, 0, -1), 0):
        first, last = spans[i]
        if first <= address <= last:
            return i, address - first
    return None


def usable(stack: torch.Tensor) -> bool:
    """Whether a call on ``stack`` may be recorded or replayed now (the module docstring's list)."""
    return (_ENABLED.on and not _recording and launch.direct() and not config.is_interpreting()
            and stack.numel() > 0 and not config.forcing() and not autotune.enabled()
            and workspace.fill_value() is None and _SWITCH.get() != "0"
            and not (stack.is_cuda and torch.cuda.is_current_stream_capturing()))


def call(fn: Callable[..., torch.Tensor], stack: torch.Tensor, *static) -> torch.Tensor:
    """``fn(stack, *static)``, replayed when this signature has been recorded. ``static`` must
    determine everything ``fn`` launches besides the stack's shape, strides, dtype and alignment."""
    if not usable(stack):
        return fn(stack, *static)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    key = (fn, static, stack.shape, stack.stride(), stack.dtype, stack.data_ptr() & 15, stack.device, device, stream)
    plan = _plans.get(key)
    if plan is not None and plan.counters_forgotten != COUNTERS.forgotten and plan.kept:
        _plans.pop(key, None)  # a launch raised since the recording: the counters it holds may be the dropped ones
        plan = None
    if plan is not None:
        try:
            return plan.replay(stack, stream)
        except BaseException:
            forget(key)
            raise
    if _failures.get(key, 0) >= ATTEMPTS or len(_plans) >= MAX_PLANS or len(_failures) >= MAX_PLANS:
        return fn(stack, *static)
    return _record(key, fn, stack, static)


def _record(key: tuple, fn, stack: torch.Tensor, static: tuple) -> torch.Tensor:
    global _recording
    recording = _Recording(stack)
    workspace.observers.append(recording.allocated)
    launch.observers.append(recording.launched)
    _recording = True
    try:
        with recording:
            out = fn(stack, *static)
    finally:
        _recording = False
        workspace.observers.remove(recording.allocated)
        launch.observers.remove(recording.launched)
    plan = recording.plan(stack, out) if recording.valid and isinstance(out, torch.Tensor) else None
    if plan is None:
        _failures[key] = _failures.get(key, 0) + 1
    else:
        _plans[key] = plan
        _failures.pop(key, None)
    return out


def forget(key: tuple) -> None:
    """Drop a plan whose replay raised: its kept arrival counters may not be back at zero."""
    plan = _plans.pop(key, None)
    for t in plan.kept if plan is not None else ():
        COUNTERS.forget(t)


def clear() -> None:
    """Forget every recording (``launch.clear`` calls this: a recording holds compiled kernels)."""
    _plans.clear()
    _failures.clear()


launch.on_clear.append(clear)


def plans() -> int:
    """How many signatures replay (tests and benchmarks)."""
    return len(_plans)


def replays(enabled: bool):
    """Replay on or off inside the block (benchmarks time both in one process)."""
    return _ENABLED.set(enabled)
