"""``triton_kernels.launch``: direct launches of compiled kernels, checked against the installed
Triton on a CPU (no interpreter: the kernels are real JITFunctions; Triton's driver and every
compiled kernel's C launcher are stand-ins from bench/launch_overhead.py, which record calls).

Two claims carry the direct path:
1. its key is at least as fine as Triton's own specialization (the binder ``JITFunction.run``
   uses, for an sm_90 target), so a cached compiled kernel is the one Triton would have picked;
2. the direct call hands the compiled kernel's launcher exactly what ``JITFunction.run`` hands it.
Both are checked on every launch a Triton-backend ``Muon.step()`` makes (default, small-matrix,
NorMuon + hyperball buckets) plus a forced split-K product. ``make test`` runs this file under
Triton 3.6 as well as the current one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the direct path is off under the interpreter (tests/interpreter covers that path)",
                allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import launch_overhead  # noqa: E402
import muon_kernels as mk  # noqa: E402
from muon_kernels.triton_kernels import launch as launch_module  # noqa: E402
from muon_kernels.triton_kernels.config import MatmulConfig  # noqa: E402
from muon_kernels.triton_kernels.symmetric_matmul import symmetric_matmul  # noqa: E402


def step_launches() -> list:
    """(kernel, grid, args, constexprs) of every launch of a second Triton-backend step, taken
    through Triton's dispatch, plus a split-K product (reduced in the same launch)."""
    g = torch.Generator().manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(64, 192), (768, 2304), (4096, 1024)]]
    varied = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(256, 512), (512, 256)]]
    for p in plain + varied:
        p.grad = torch.randn(p.shape, generator=g)
    opt = mk.Muon([dict(params=plain), dict(params=varied, adaptive="normuon", constraint="hyperball",
                                            weight_decay=0.0)], lr=0.02, backend="triton", dispatch="table")
    with launch_module.direct_launches(False):
        opt.step()
        with launch_overhead.recorded_launches() as seen:
            opt.step()
            X = torch.randn(1, 64, 512, generator=g).to(torch.bfloat16)
            symmetric_matmul(X, config=MatmulConfig(32, 32, 32, 4, 1, split_k=3))
    return list(seen)


@pytest.fixture(scope="module")
def launches():
    with launch_overhead.stand_in() as calls:
        yield step_launches(), calls


def test_every_kernel_is_covered(launches):
    seen, _ = launches
    assert {k.__name__ for k, *_ in seen} == {k.__name__ for k in launch_overhead.jit_kernels()}


def test_every_launch_passes_its_kernels_fp_fusion(launches):
    """Each launch compiles with the contraction setting ``config.fp_fusion`` gives its kernel (the
    registry bench/sass_report.py and the AOT tests compile with): off exactly for the kernels that
    round as torch does, op by op (momentum, update, the variant factors), on for the rest."""
    from muon_kernels.triton_kernels import config

    seen, _ = launches
    assert {k.__name__ for k, *_ in seen if not config.fp_fusion(k)} == {
        "_fused_momentum_kernel", "_fused_apply_update_kernel", "_variant_factors_kernel"}
    for kernel, _grid, _args, constexprs in seen:
        assert constexprs["enable_fp_fusion"] is config.fp_fusion(kernel), kernel.__name__


def _same(a, b) -> bool:
    """Launcher arguments equal: tensors by identity, NaN floats alike, launch metadata (a fresh
    LazyDict per call) by its contents, the rest by value."""
    if type(a).__name__ == "LazyDict" and type(b) is type(a):
        return a.data == b.data and a.extras == b.extras
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def test_direct_launch_hands_the_launcher_what_triton_does(launches):
    seen, calls = launches
    real_run = launch_overhead.JITFunction.run
    dispatched = []

    def counting_run(self, *args, **kwargs):
        dispatched.append(self.__name__)
        return real_run(self, *args, **kwargs)

    for kernel, grid, args, constexprs in seen:
        launch_module.clear()
        calls.clear()
        kernel[grid](*args, **constexprs)  # Triton's dispatch
        launch_module.launch(kernel, grid, *args, **constexprs)  # first of its key: Triton's dispatch again
        launch_overhead.JITFunction.run = counting_run
        try:
            launch_module.launch(kernel, grid, *args, **constexprs)  # direct
        finally:
            launch_overhead.JITFunction.run = real_run
        assert not dispatched, f"{kernel.__name__}: the repeat went through JITFunction.run"
        assert launch_module.entries(kernel) == 1
        (compiled, triton_call), (first, first_call), (direct, direct_call) = calls
        assert compiled == first == direct and compiled.startswith(kernel.__name__ + "@0#"), \
            "the direct call reached another compiled kernel than Triton's dispatch"
        assert len(direct_call) == len(triton_call)
        mismatched = [i for i, (a, b) in enumerate(zip(triton_call, direct_call)) if not _same(a, b)]
        assert not mismatched, f"{kernel.__name__}: launcher arguments differ at {mismatched}"
        assert all(_same(a, b) for a, b in zip(triton_call, first_call))


def test_direct_launches_follow_the_stream_the_hooks_and_the_device(launches):
    """The stream and the launch hooks are read on every direct call, as Triton's dispatch reads
    them; a key made on one device never serves another (Triton compiles per device)."""
    from triton import knobs

    seen, calls = launches
    driver = calls.driver
    kernel, grid, args, constexprs = next(s for s in seen if s[0].__name__ == "_symmetric_matmul_kernel")
    entered = []
    hook = lambda metadata: entered.append(metadata.get()["stream"])  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch_module.clear()
        calls.clear()
        driver.stream = 0x1111
        kernel[grid](*args, **constexprs)
        launch_module.launch(kernel, grid, *args, **constexprs)
        launch_module.launch(kernel, grid, *args, **constexprs)  # direct, on 0x1111
        driver.stream = 0x2222
        launch_module.launch(kernel, grid, *args, **constexprs)  # direct, on 0x2222
        driver.device = 1
        launch_module.launch(kernel, grid, *args, **constexprs)  # another device: Triton's dispatch
        launch_module.launch(kernel, grid, *args, **constexprs)  # direct on device 1
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
        driver.device, driver.stream = 0, 0x5EED
    streams = [call[3] for _, call in calls]
    assert streams == [0x1111, 0x1111, 0x1111, 0x2222, 0x2222, 0x2222]
    assert entered == streams  # the enter hook ran on every launch, with that launch's metadata
    assert all(_same(a, b) for a, b in zip(calls[0][1], calls[2][1]))  # the hook's metadata (a LazyDict) alike
    assert [name.split("#")[0] for name, _ in calls] == [f"{kernel.__name__}@{d}" for d in (0, 0, 0, 0, 1, 1)]
    assert launch_module.entries(kernel) == 2


def _variants(args: tuple, constexprs: dict) -> list[tuple[tuple, dict]]:
    """The call with what the key leaves out changed: every float, and every tensor moved to a new
    allocation of another shape with the same dtype and address mod 16. Plus changes Triton does
    specialize on, so the check can fail: each int in each of Triton's int classes, each tensor in
    another dtype and off 16-byte alignment, a 0 or 1 passed as a bool (an argument or a constexpr flag), and two
    constexprs of one type trading names (as two call sites passing them in another order would;
    a key of values without names would merge those)."""
    out = [(args, constexprs)]
    for value in (0.0, 1.0, -2.5, 3.0e38, 1e-30, float("nan")):
        out.append((tuple(value if type(a) is float else a for a in args), constexprs))
    for i, a in enumerate(args):
        if type(a) is int:  # Triton's int classes: 1, multiples of 16, others; i32, i64, u64
            for value in (1, 16, 17, 2**31 + 16, 2**63 + 16):
                out.append((args[:i] + (value,) + args[i + 1:], constexprs))
        if isinstance(a, torch.Tensor):
            other = torch.float32 if a.dtype != torch.float32 else torch.bfloat16
            retyped = torch.empty(a.numel() + 16, dtype=other)
            out.append((args[:i] + (retyped,) + args[i + 1:], constexprs))  # allocations are 16-byte aligned
            fresh = torch.empty(a.numel() + 64, dtype=a.dtype)
            shift = ((a.data_ptr() & 15) - (fresh.data_ptr() & 15)) % 16 // a.element_size()
            moved = fresh[shift:shift + max(a.numel(), 1)]
            assert moved.data_ptr() & 15 == a.data_ptr() & 15
            out.append((args[:i] + (moved,) + args[i + 1:], constexprs))
            if a.element_size() < 16:  # 2–8 bytes off the allocation's alignment
                out.append((args[:i] + (fresh[1:],) + args[i + 1:], constexprs))
        elif type(a) is int and a in (0, 1):  # equal as values and as hashes, typed apart by Triton
            out.append((args[:i] + (bool(a),) + args[i + 1:], constexprs))
    for name, value in constexprs.items():  # a flag given as 1 instead of True: equal, hashed alike, typed apart
        if type(value) is bool or (type(value) is int and value in (0, 1)):
            out.append((args, {**constexprs, name: int(value) if type(value) is bool else bool(value)}))
    names = list(constexprs)
    for x, first in enumerate(names):
        for y in range(x + 1, len(names)):
            second = names[y]
            a, b = constexprs[first], constexprs[second]
            if type(a) is type(b) and a != b:  # the names trade places, the values stay in order
                renamed = names[:x] + [second] + names[x + 1:y] + [first] + names[y + 1:]
                out.append((args, dict(zip(renamed, constexprs.values()))))
    return out


def test_key_refines_tritons_specialization(launches):
    seen, _ = launches
    distinguished = 0
    for kernel, _grid, args, constexprs in seen:
        binder = kernel.device_caches[0][4]  # the stand-in device's binder, an sm_90 target
        triton_keys, our_keys = {}, {}
        for variant, given in _variants(args, constexprs):
            _, specialization, options = binder(*variant, **dict(given, debug=False))
            triton_key = (str(specialization), str(options))
            ours = launch_module.key_of(variant, given)
            # Equal keys of ours must mean Triton would run the same compiled kernel.
            assert triton_keys.setdefault(ours, triton_key) == triton_key, (
                f"{kernel.__name__}: launch's key merges calls Triton specializes apart")
            our_keys.setdefault(triton_key, set()).add(ours)
        distinguished += len(our_keys) > 1
    assert distinguished == len(seen)  # every launch has a misaligned variant Triton tells apart


def test_fallbacks_go_through_tritons_dispatch(launches):
    seen, calls = launches
    kernel, grid, args, constexprs = next(s for s in seen if s[0].__name__ == "_sum_squares_kernel")
    launch_module.clear()
    with launch_module.direct_launches(False):
        for _ in range(2):
            launch_module.launch(kernel, grid, *args, **constexprs)
    assert launch_module.entries(kernel) == 0
    # An argument outside the keyed types (a TMA descriptor is an unhashable dataclass): never cached.
    @dataclasses.dataclass
    class Descriptor:
        base: torch.Tensor
    odd = (Descriptor(args[0]),) + args[1:]
    real_run = launch_overhead.JITFunction.run
    launch_overhead.JITFunction.run = lambda self, *a, **k: calls.append(("dispatched", a))
    try:
        calls.clear()
        for _ in range(2):
            launch_module.launch(kernel, grid, *odd, **constexprs)
    finally:
        launch_overhead.JITFunction.run = real_run
    assert [c[0] for c in calls] == ["dispatched", "dispatched"] and launch_module.entries(kernel) == 0
    # A kernel with pre-run hooks: Triton runs them, so every call is Triton's.
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    try:
        for _ in range(2):
            launch_module.launch(kernel, grid, *args, **constexprs)
        assert launch_module.entries(kernel) == 0
    finally:
        kernel.pre_run_hooks.pop()


def test_entries_are_bounded_per_site(launches, monkeypatch):
    seen, _ = launches
    kernel, grid, args, constexprs = next(s for s in seen if s[0].__name__ == "_sum_squares_kernel")
    monkeypatch.setattr(launch_module, "MAX_ENTRIES", 3)
    launch_module.clear()
    ints = [i for i, a in enumerate(args) if type(a) is int]
    for value in range(2, 8):  # six keys: one int argument takes six values
        launch_module.launch(kernel, grid, *(value if i == ints[0] else a for i, a in enumerate(args)), **constexprs)
    assert launch_module.entries(kernel) == 3


def test_what_tritons_dispatch_hands_back_is_kept_only_when_it_is_a_compiled_kernel(launches):
    """``kernel[grid]`` returns None when a jit_cache_hook skipped the launch (nothing is kept, so
    the next call is Triton's again), and a FutureKernel in Triton 3.9's async compile mode (its
    result, the compiled kernel, is kept)."""
    seen, calls = launches
    kernel, grid, args, constexprs = next(s for s in seen if s[0].__name__ == "_scale_cast_kernel")
    real_run = launch_overhead.JITFunction.run
    compiled = launch_overhead.StandInCompiled("resolved", calls)

    class Future:
        def result(self):
            return compiled

    for handed_back, kept in ((None, 0), (Future(), 1)):
        launch_module.clear()
        launch_overhead.JITFunction.run = lambda self, *a, **k: handed_back
        try:
            launch_module.launch(kernel, grid, *args, **constexprs)
        finally:
            launch_overhead.JITFunction.run = real_run
        assert launch_module.entries(kernel) == kept
    calls.clear()
    launch_module.launch(kernel, grid, *args, **constexprs)
    assert [name for name, _ in calls] == ["resolved"]


def test_the_launch_overhead_benchmark_runs():
    """bench/launch_overhead.py end to end on a small model (its numbers are the README's, on a GPU
    host they are measured the same way; here only the harness is checked)."""
    result = launch_overhead.measure("gpt2-small", layers=1, width_divisor=8, repeats=3, steps=2)
    assert {"_fused_momentum_kernel", "_symmetric_matmul_kernel", "_ns_update_kernel",
            "_fused_apply_update_kernel"} <= set(result["per_kernel"])
    assert all(row["triton_dispatch_us"] > 0 and row["direct_us"] > 0 for row in result["per_kernel"].values())
    assert result["step"]["launches"] > 0 and result["newton_schulz"]["launches"] == 17
    assert all(result["step"][f"{mode}_ms"] > 0 and result["newton_schulz"][f"{mode}_us"] > 0
               for mode in launch_overhead.MODES)
