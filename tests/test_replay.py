"""``triton_kernels.replay``: a recorded Newton–Schulz call replayed with fresh buffers hands every
compiled kernel's launcher what the plain call hands it, checked on a CPU with the stand-in driver
and launchers of bench/launch_overhead.py (the kernels are real JITFunctions; nothing computes).

Every launcher argument is compared in a canonical form: a pointer becomes (the call's n-th
allocation, byte offset) — the latest allocation holding it, as the allocator may hand a freed
buffer's memory to a later one — or ("input", offset), or the address itself for a tensor the call
did not allocate (arrival counters, coefficient tables); everything else must be equal. The bits
of replayed results on a GPU are tests/gpu's (test_triton_gpu.py::test_replayed_calls_*).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("replay is off under the interpreter", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import launch_overhead  # noqa: E402
from step_memory import LiveTensors  # noqa: E402
import muon_kernels as mk  # noqa: E402
from muon_kernels import workspace  # noqa: E402
from muon_kernels.ns_config import resolve_ns_config  # noqa: E402
from muon_kernels.triton_kernels import autotune, config, launch, replay  # noqa: E402
from muon_kernels.triton_kernels.newton_schulz import cublas_newton_schulz, newton_schulz  # noqa: E402
from muon_kernels.triton_kernels.small_newton_schulz import small_newton_schulz  # noqa: E402

KELLER = resolve_ns_config("keller", 5, 1e-7)
CASES = {  # (function, stack, config, ns_dtype); off a GPU the products take 32-wide tiles on 4 "SMs",
    # so the first case's X·Xᵀ (one tile, 64 K steps) splits along K, reduced through arrival counters
    "standard": (newton_schulz, lambda: torch.randn(1, 32, 2048), KELLER, torch.bfloat16),
    "unsplit": (newton_schulz, lambda: torch.randn(1, 256, 1024), KELLER, torch.bfloat16),
    "batched, transposed view, fp32": (newton_schulz, lambda: torch.randn(3, 160, 96).mT, KELLER, torch.float32),
    "misaligned input": (newton_schulz, lambda: torch.randn(2 * 64 * 192 + 1)[1:].view(2, 64, 192), KELLER,
                         torch.bfloat16),
    "gram, restarts": (newton_schulz, lambda: torch.randn(2, 128, 512),
                       resolve_ns_config("keller", 5, 1e-7, "gram", ns_gram_restarts=(1, 3)), torch.bfloat16),
    "small": (small_newton_schulz, lambda: torch.randn(5, 24, 40), KELLER, torch.bfloat16),
    # A stack the caller gives up: the second m×n buffer in its memory, the result there too (5 steps).
    "consumed fp32 stack": (functools.partial(newton_schulz, consume=True), lambda: torch.randn(2, 64, 192), KELLER,
                            torch.bfloat16),
    "consumed, normalized over the stack": (functools.partial(newton_schulz, consume=True),
                                            lambda: torch.randn(2, 64, 192).bfloat16(), KELLER, torch.bfloat16),
}


class _Allocations(TorchDispatchMode):
    """Every tensor allocated while active, in order. It holds them, so no address is reused within
    the call and a pointer names one allocation (``step_memory.LiveTensors``, which measures peaks, must not)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default):
            self.made.append(out)
        return out


def _span(t):
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size() - 1


def _canonical(address: int, made, stack) -> tuple:
    for i in range(len(made) - 1, -1, -1):
        first, last = _span(made[i])
        if first <= address <= last:
            return ("allocation", i, address - first)
    first, last = _span(stack)
    if first <= address <= last:
        return ("input", address - first)
    return ("elsewhere", address)


def _launches(calls, fn, stack, *static):
    """(the launcher calls, canonical) of one call: name, grid, stream, then each kernel argument
    (pointers canonical, the rest as they are), and the result."""
    calls.clear()
    with _Allocations() as seen:
        out = fn(stack, *static)
    canon = []
    for name, args in calls:
        kernel_args = []
        for a in args[9:]:
            if isinstance(a, torch.Tensor):
                a = a.data_ptr()
            kernel_args.append(a)
        canon.append((name, args[:4], args[4:6], tuple(kernel_args)))
    return canon, seen.made, out


def _compare(plain, replayed, stack, names_of_pointers):
    (p_calls, p_made, p_out), (r_calls, r_made, r_out) = plain, replayed
    assert len(p_calls) == len(r_calls) > 0
    for (pn, pg, pf, pa), (rn, rg, rf, ra) in zip(p_calls, r_calls):
        assert (pn, pg, pf) == (rn, rg, rf)
        assert len(pa) == len(ra)
        for i, (x, y) in enumerate(zip(pa, ra)):
            if i in names_of_pointers[pn]:
                assert _canonical(x, p_made, stack) == _canonical(y, r_made, stack), (pn, i)
            else:
                assert type(x) is type(y) and x == y, (pn, i, x, y)
    assert (p_out.shape, p_out.stride(), p_out.dtype) == (r_out.shape, r_out.stride(), r_out.dtype)
    assert _canonical(p_out.data_ptr(), p_made, stack) == _canonical(r_out.data_ptr(), r_made, stack)


def _pointer_positions(calls) -> dict:
    """Per compiled kernel, the kernel-argument positions the plain path passes tensors at."""
    return {name: {i for i, a in enumerate(args[9:]) if isinstance(a, torch.Tensor)} for name, args in calls}


@pytest.fixture
def calls():
    with launch_overhead.stand_in() as recorded:
        yield recorded


@pytest.mark.parametrize("case", CASES)
def test_a_replayed_call_launches_what_the_plain_call_launches(calls, case):
    fn, make, cfg, dtype = CASES[case]
    stack = make()
    with replay.replays(False):
        fn(stack, cfg, dtype)  # compiles (through Triton's dispatch) and fills every launch cache
        names = _pointer_positions(calls)
        plain = _launches(calls, fn, stack, cfg, dtype)
    names = _pointer_positions(calls)
    recording = _launches(calls, lambda *a: replay.call(fn, *a), stack, cfg, dtype)
    assert replay.plans() == 1, replay._failures
    replayed = _launches(calls, lambda *a: replay.call(fn, *a), stack, cfg, dtype)
    again = _launches(calls, lambda *a: replay.call(fn, *a), stack, cfg, dtype)
    assert replay.plans() == 1
    for other in (recording, replayed, again):
        _compare(plain, other, stack, names)
    # Replayed launches pass addresses as integers (no tensor reaches the launcher).
    assert not any(isinstance(a, torch.Tensor) for _, args in calls for a in args[9:])


def test_a_call_that_makes_its_streams_counters_is_recorded(calls, monkeypatch):
    """The per-stream arrival counters outlive the call that makes them: made outside the
    recording's watch, they are a kept tensor of its plan, and that first call is recorded."""
    fn, make, cfg, dtype = CASES["standard"]
    stack = make()
    with replay.replays(False):
        fn(stack, cfg, dtype)  # compiles: a compiling call is never kept
    monkeypatch.setattr(replay.COUNTERS, "by_stream", {})
    replay.call(fn, stack, cfg, dtype)
    assert replay.plans() == 1, replay._failures
    [plan] = replay._plans.values()
    assert any(t is c for t in plan.kept for c in replay.COUNTERS.by_stream.values())


def test_a_signature_change_records_again(calls):
    """Each signature gets its own recording (a first call may compile, and is not kept: the next
    one records)."""
    fn, make, cfg, dtype = CASES["standard"]
    stack = make()
    variants = [lambda: (stack, cfg, dtype),
                lambda: (stack[:, :, :1024], cfg, dtype),  # other strides and shape
                lambda: (stack, cfg, torch.float16),  # other ns_dtype
                lambda: (stack, resolve_ns_config("polar_express", 5, 1e-7), dtype),  # other coefficients
                # the same shape and strides 4 bytes off alignment (Triton specializes on it)
                lambda: (torch.randn(stack.numel() + 1)[1:].view(stack.shape), cfg, dtype),
                lambda: (calls.driver.__setattr__("stream", 0xB0B), (stack, cfg, dtype))[1]]  # another stream
    for count, variant in enumerate(variants, start=1):
        args = variant()
        for _ in range(3):
            replay.call(fn, *args)
        assert replay.plans() == count


@pytest.mark.parametrize("switch", ["debug fill", "autotune", "forced config", "direct launches off", "env off"])
def test_switches_turn_replay_off(calls, switch, monkeypatch):
    fn, make, cfg, dtype = CASES["standard"]
    stack = make()
    replay.call(fn, stack, cfg, dtype)
    replay.call(fn, stack, cfg, dtype)
    assert replay.plans() == 1

    def refuse(*_):
        raise AssertionError("replayed although switched off")

    monkeypatch.setattr(replay._Plan, "replay", refuse)
    context = {
        "debug fill": lambda: monkeypatch.setenv(workspace.FILL_VARIABLE, "nan"),
        "autotune": lambda: monkeypatch.setenv(autotune.ENV, "1"),
        "env off": lambda: monkeypatch.setenv(replay.ENV, "0"),
    }
    if switch in context:
        context[switch]()
        replay.call(fn, stack, cfg, dtype)
    elif switch == "forced config":
        forced = config.matmul_config(stack.device, dtype, 32, 32, 2048)
        with config.forced(symmetric=forced, ns_update=forced):
            replay.call(fn, stack, cfg, dtype)
    else:
        with launch.direct_launches(False):
            replay.call(fn, stack, cfg, dtype)


@pytest.mark.parametrize("fn, cfg", [(cublas_newton_schulz, KELLER),  # products on torch.bmm
                                     (newton_schulz, resolve_ns_config("turbo", None, 1e-7))])  # AOL: torch ops
def test_a_call_that_runs_other_torch_ops_is_never_replayed(calls, monkeypatch, fn, cfg):
    """Its recordings fail, and after ATTEMPTS of them the signature is left to the plain path
    (no recording per call)."""
    stack = torch.randn(1, 64, 256)
    recordings = []
    real = replay._record
    monkeypatch.setattr(replay, "_record", lambda *a: recordings.append(1) or real(*a))
    for _ in range(replay.ATTEMPTS + 3):
        out = replay.call(fn, stack, cfg, torch.float32)
        assert out.shape == stack.shape
    assert replay.plans() == 0 and len(recordings) == replay.ATTEMPTS


def test_a_call_that_allocates_outside_the_workspace_is_never_replayed(calls):
    """A buffer made with torch.empty rather than workspace.empty is not in the recording: a replay
    would not make it (a launch given it would get the recording's stale address), so no plan is kept."""
    fn, make, cfg, dtype = CASES["unsplit"]

    def allocating(stack, cfg, dtype):
        torch.empty(16)
        return fn(stack, cfg, dtype)

    stack = make()
    for _ in range(replay.ATTEMPTS + 1):
        replay.call(allocating, stack, cfg, dtype)
    assert replay.plans() == 0


def test_a_replay_that_raises_is_dropped(calls, monkeypatch):
    fn, make, cfg, dtype = CASES["standard"]
    stack = make()
    replay.call(fn, stack, cfg, dtype)
    replay.call(fn, stack, cfg, dtype)
    [plan] = replay._plans.values()
    assert plan.kept, "the split products' arrival counters are held by the plan"
    forgotten = []
    monkeypatch.setattr(replay.COUNTERS, "forget", forgotten.append)
    compiled = plan.launches[3][0]
    monkeypatch.setattr(compiled, "_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        replay.call(fn, stack, cfg, dtype)
    assert replay.plans() == 0 and forgotten == plan.kept


def _recorded(case: str) -> tuple:
    """(fn, stack, config, dtype) of CASES[case], its call recorded (the first call) and replayed once."""
    fn, make, cfg, dtype = CASES[case]
    stack = make()
    replay.call(fn, stack, cfg, dtype)
    replay.call(fn, stack, cfg, dtype)
    assert replay.plans() == 1
    return fn, stack, cfg, dtype


def test_launch_clear_forgets_recordings(calls):
    _recorded("standard")
    launch.clear()
    assert replay.plans() == 0


def test_replayed_launches_build_metadata_for_launch_hooks_only(calls):
    """A launch hook gets each replayed launch's metadata, as from Triton's runner; without one
    (an empty HookChain) no metadata is built."""
    from triton import knobs

    fn, stack, cfg, dtype = _recorded("standard")
    calls.clear()
    replay.call(fn, stack, cfg, dtype)
    assert calls and all(args[6] is None for _, args in calls)
    for chain in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):  # either hook alone
        entered = []
        hook = lambda metadata: entered.append((metadata.get()["name"], metadata.get()["stream"]))  # noqa: E731
        chain.add(hook)
        try:
            calls.clear()
            replay.call(fn, stack, cfg, dtype)
        finally:
            chain.remove(hook)
        assert replay.plans() == 1 and entered == [(name, args[3]) for name, args in calls]


def test_a_triton_backend_step_replays_every_bucket(calls):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(64, 192), (64, 192), (256, 512), (512, 256)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = mk.Muon(params, lr=0.02, backend="triton", dispatch="table")
    for _ in range(3):
        opt.step()
    assert replay.plans() == len(opt._buckets) == 2
    calls.clear()
    opt.step()
    launches = len(calls)
    with replay.replays(False):
        calls.clear()
        opt.step()
    assert len(calls) == launches


def test_an_address_resolves_to_the_latest_buffer_holding_it():
    """Within a call the allocator may give a freed buffer's memory to a later, bigger one: a launch
    after the second allocation means the second (replay allocates both, so the first may be too
    small); a launch before it, the first."""
    spans = [(1000, 1999), (5000, 5099), (5000, 5199)]  # the input, then two buffers at one address
    assert replay._locate(spans, 2, 5000) == (2, 0)
    assert replay._locate(spans, 2, 5150) == (2, 150)
    assert replay._locate(spans, 1, 5050) == (1, 50)
    assert replay._locate(spans, 1, 5150) is None
    assert replay._locate(spans, 2, 1500) == (0, 500)


def test_dropped_arrival_counters_make_their_holders_record_again(calls, monkeypatch):
    """A launch that raised drops its stream's counters (some may not be back at zero): a recording
    that holds counters records again instead of replaying with them."""
    fn, make, cfg, dtype = CASES["standard"]
    stack = make()
    for _ in range(2):
        replay.call(fn, stack, cfg, dtype)
    [old] = replay._plans.values()
    replay.COUNTERS.forget(old.kept[0])
    recordings = []
    real = replay._record
    monkeypatch.setattr(replay, "_record", lambda *a: recordings.append(1) or real(*a))
    for _ in range(3):
        replay.call(fn, stack, cfg, dtype)
    [new] = replay._plans.values()
    assert new is not old and recordings and all(t is not old.kept[0] for t in new.kept)


def test_a_launch_from_another_thread_spoils_a_recording():
    import threading

    recording = replay._Recording(torch.empty(1))
    other = threading.Thread(target=recording.launched, args=(("compiled", (1, 1, 1), (), ()),))
    other.start()
    other.join()
    assert not recording.valid
    recording = replay._Recording(torch.empty(1))
    other = threading.Thread(target=recording.allocated, args=(torch.empty(1),))
    other.start()
    other.join()
    assert not recording.valid


@pytest.mark.parametrize("case", ["standard", "unsplit", "batched, transposed view, fp32"])
def test_a_replay_holds_no_more_memory_than_the_plain_call(calls, case):
    """Buffers are allocated before their first launch and let go after their last, so a replay's
    peak is at most the plain call's (a replay that let nothing go before it returned would exceed
    the plain peak here)."""
    fn, make, cfg, dtype = CASES[case]
    stack = make()
    for _ in range(2):
        replay.call(fn, stack, cfg, dtype)
    calls.recording = False  # the record would hold every launch's tensors
    peaks = []
    for enabled in (False, True):
        with replay.replays(enabled), LiveTensors() as live:
            out = replay.call(fn, stack, cfg, dtype)
        del out
        peaks.append(live.peak_bytes)
    assert replay.plans() == 1 and 0 < peaks[1] <= peaks[0], peaks
    replay.clear()  # the recording call too: it keeps its buffers' geometry, not the buffers
    with LiveTensors() as live:
        out = replay.call(fn, stack, cfg, dtype)
    del out
    assert replay.plans() == 1 and live.peak_bytes == peaks[0]


def test_a_result_that_views_a_buffer_with_other_strides_keeps_its_strides(calls):
    """A call whose result is a transposed view of a square buffer it made (same shape, dtype and
    start as the buffer, other strides) replays to the same view, not to the buffer itself."""
    fn, _, cfg, dtype = CASES["unsplit"]

    def transposed(stack, cfg, dtype):
        return fn(stack, cfg, dtype).mT

    stack = torch.randn(2, 128, 128)
    with replay.replays(False):
        fn(stack, cfg, dtype)  # compiles
        names = _pointer_positions(calls)
        plain = _launches(calls, transposed, stack, cfg, dtype)
    assert plain[2].stride() != plain[2].contiguous().stride()
    _launches(calls, lambda *a: replay.call(transposed, *a), stack, cfg, dtype)
    assert replay.plans() == 1, replay._failures
    _compare(plain, _launches(calls, lambda *a: replay.call(transposed, *a), stack, cfg, dtype), stack, names)
