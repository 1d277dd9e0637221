"""Host time of one Triton launch on a CPU: Triton's dispatch (``kernel[grid](...)``) against
``triton_kernels.launch``'s direct path, for every launch a Triton-backend ``Muon.step()`` makes.

Both paths run the installed Triton's real Python — ``JITFunction.run`` (binder, specialization,
cache key, globals check, launch metadata) on one side, our key and ``CompiledKernel[grid]`` on
the other — and end in the same call of a compiled kernel's C launcher. Without a GPU that launcher
and Triton's driver are stand-ins (``stand_in``): the driver reports device 0, a stream and an
sm_90 target, and every kernel's "compiled kernel" records its launcher call instead of making it.
So the times are the Python each path runs per launch, which is what the direct path removes;
the C launcher and ``cuLaunchKernel`` (a few µs on a GPU host) come on top of both alike.

    python bench/launch_overhead.py [--model gpt2-small] [--layers 12] [--repeats 2000]

Prints, per kernel, µs per launch through ``kernel[grid]`` and through ``launch``, and the sum over
one step's launches. ``tests/test_launch.py`` uses the same stand-ins to check that both paths hand
the launcher identical arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("launch_overhead.py measures compiled-kernel dispatch: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import CompiledKernel  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from muon_kernels.triton_kernels import launch as launch_module  # noqa: E402
from muon_kernels.triton_kernels import replay  # noqa: E402

DEVICES = (0, 1)  # the stand-in driver's devices: a key made on one must not serve the other


class StandInDriver:
    """What ``JITFunction.run`` and ``CompiledKernel[grid]`` ask Triton's driver for; the current
    device and stream are plain attributes a test may change."""

    def __init__(self):
        self.device, self.stream = 0, 0x5EED

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return self.stream

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class Calls(list):
    """The stand-in launchers' record: (compiled kernel's name, arguments) per call while
    ``recording``; the timing loops turn it off (a growing list of argument tuples would time the
    garbage collector)."""

    recording = True


class StandInCompiled(CompiledKernel):
    """A compiled kernel whose C launcher records its arguments: the real ``CompiledKernel``
    methods (``__getitem__``'s runner, ``launch_metadata``) run unchanged around it."""

    def __init__(self, name: str, calls: Calls):  # noqa: super().__init__ would load a cubin
        self.name = name
        self.module = object()  # handles "loaded": _init_handles returns at once
        self._module_pid = None
        self.src = None  # launch_metadata: no per-kernel metadata function
        self.function = f"CUfunction<{name}>"
        self.packed_metadata = (f"metadata<{name}>",)
        self._run = lambda *args: self._launch(name, calls, args)

    def __del__(self):  # nothing was loaded, so nothing to unload (Triton 3.8's would ask the driver)
        pass

    @staticmethod
    def _launch(name: str, calls: Calls, args: tuple) -> None:
        """Record, and call the enter and exit hooks with the launch metadata as the C launcher
        does: (grid x, y, z, stream, function, packed metadata, launch metadata, enter hook, exit
        hook, kernel arguments...)."""
        if calls.recording:
            calls.append((name, args))
        for hook in args[7:9]:
            if hook is not None:
                hook(args[6])


class _StandInCache(dict):
    """A kernel's cache for one device that "compiles" a distinct stand-in per Triton cache key
    (named kernel@device#n), so ``JITFunction.run`` never compiles and a launch that reached the
    wrong compiled kernel shows in the record."""

    def __init__(self, name: str, device: int, calls: Calls):
        super().__init__()
        self.name, self.device, self.calls = name, device, calls

    def get(self, key, default=None):
        if key not in self:
            self[key] = StandInCompiled(f"{self.name}@{self.device}#{len(self)}", self.calls)
        return self[key]


def jit_kernels() -> list[JITFunction]:
    """Every @triton.jit kernel this package launches."""
    from muon_kernels.triton_kernels import (fused_update, newton_schulz, small_newton_schulz, symmetric_matmul,
                                             variant_statistics)

    found = []
    for module in (fused_update, newton_schulz, small_newton_schulz, symmetric_matmul, variant_statistics):
        found += [v for k, v in vars(module).items() if isinstance(v, JITFunction) and k.endswith("_kernel")]
    return found


@contextlib.contextmanager
def stand_in():
    """Triton's driver and every kernel's per-device caches replaced by stand-ins, and the Triton
    backend admitted on CPU tensors (its launches now go nowhere); yields the list the launchers'
    calls are recorded into (compiled kernel's name, arguments), with the stand-in driver as its
    ``driver`` attribute. Restores everything on exit."""
    from muon_kernels import backends

    calls = Calls()
    calls.driver = StandInDriver()
    saved_driver, saved_status = driver._active, backends._STATUS["triton"]
    backends._STATUS["triton"] = lambda device: (True, "stand-in driver: launches are recorded, not made")
    saved = {(k, d): k.device_caches.get(d) for k in jit_kernels() for d in DEVICES}
    driver.set_active(calls.driver)
    launch_module.clear()
    try:
        for kernel, device in saved:
            _, key_cache, target, backend, binder = kernel.create_binder()
            kernel.device_caches[device] = (_StandInCache(kernel.__name__, device, calls), key_cache, target,
                                            backend, binder)
        yield calls
    finally:
        launch_module.clear()
        for (kernel, device), entry in saved.items():
            if entry is None:
                kernel.device_caches.pop(device, None)
            else:
                kernel.device_caches[device] = entry
        driver.set_active(saved_driver)
        backends._STATUS["triton"] = saved_status


@contextlib.contextmanager
def recorded_launches():
    """Yields a list that collects (kernel, grid, args, constexprs) of every ``kernel[grid](...)``
    made inside the block (``JITFunction.run`` wrapped; the call itself still happens)."""
    seen: list = []
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self, grid, args, dict(kwargs)))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    try:
        yield seen
    finally:
        JITFunction.run = real_run


def make_optimizer(model: str, layers: int, width_divisor: int):
    import muon_kernels as mk
    from common import layer_shapes

    shapes, _ = layer_shapes(model, width_divisor)
    params = [torch.nn.Parameter(torch.ones(s)) for _ in range(layers) for s in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    return mk.Muon(params, lr=0.02, backend="triton", dispatch="table")


def _best_us(fn, repeats: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6


def measure(model: str = "gpt2-small", layers: int = 12, width_divisor: int = 1, repeats: int = 2000,
            steps: int = 20) -> dict:
    """Per kernel: µs per launch through Triton's dispatch and through ``launch``; per step: the
    host time of a whole ``Muon.step()`` with direct launches off and on (best of 5 × ``steps``)."""
    with stand_in() as calls:
        opt = make_optimizer(model, layers, width_divisor)
        opt.step()  # plans, tables and caches
        calls.recording = False
        with launch_module.direct_launches(False), recorded_launches() as seen:
            opt.step()
        per_launch = {}
        for kernel, grid, args, kwargs in seen:
            name = kernel.__name__
            if name in per_launch:
                continue
            launch_module.launch(kernel, grid, *args, **kwargs)  # makes the entry
            per_launch[name] = {
                "triton_dispatch_us": _best_us(lambda: kernel[grid](*args, **kwargs), repeats),
                "direct_us": _best_us(lambda: launch_module.launch(kernel, grid, *args, **kwargs), repeats),
                "arguments": len(args) + len(kwargs),
            }
        step = {}
        for label in MODES * 2:  # interleaved: this VM's speed drifts
            with _mode(label):
                opt.step()
                ms = _best_us(opt.step, steps) / 1e3
            step[f"{label}_ms"] = min(step.get(f"{label}_ms", float("inf")), ms)
        calls.clear()
        calls.recording = True
        opt.step()
        launches = len(calls)
        ns = newton_schulz_host_time(calls, repeats=max(repeats // 10, 20))
    saved = step["triton_dispatch_ms"] - step["direct_ms"]
    return {"model": model, "layers": layers, "width_divisor": width_divisor, "per_kernel": per_launch,
            "step": dict(step, launches=launches, saved_us_per_launch=saved * 1e3 / max(launches, 1)),
            "newton_schulz": ns,
            "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__}}


def newton_schulz_host_time(calls: Calls, repeats: int, shape=(1, 1024, 4096)) -> dict:
    """Host µs of one standard 5-step NS call on the symmetric kernels (the issue's batch-1
    1024×4096 point, launch-bound on the H200), both ways, interleaved."""
    from muon_kernels.ns_config import resolve_ns_config
    from muon_kernels.triton_kernels.newton_schulz import newton_schulz

    config = resolve_ns_config("keller", 5, 1e-7)
    G = torch.randn(*shape)
    calls.clear()
    calls.recording = True
    newton_schulz(G, config, torch.bfloat16)
    launches = len(calls)
    calls.recording = False
    out = {"shape": list(shape), "launches": launches}
    for label in MODES * 2:
        with _mode(label):
            for _ in range(2):  # compile, then record
                replay.call(newton_schulz, G, config, torch.bfloat16)
            us = _best_us(lambda: replay.call(newton_schulz, G, config, torch.bfloat16), repeats)
        out[f"{label}_us"] = min(out.get(f"{label}_us", float("inf")), us)
    return out


# How the launches are made: Triton's dispatch per launch; direct launches (our key, then the
# compiled kernel's launcher) with every call's Python; direct launches with recorded calls replayed.
MODES = ("triton_dispatch", "direct", "replayed")


@contextlib.contextmanager
def _mode(label: str):
    with launch_module.direct_launches(label != "triton_dispatch"), replay.replays(label == "replayed"):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width-divisor", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = measure(args.model, args.layers, args.width_divisor, args.repeats, args.steps)
    print(f"triton {r['versions']['triton']}: µs of Python per launch (stand-in driver and launcher)")
    print(f"{'kernel':<30} {'args':>4} {'kernel[grid]':>12} {'launch':>8}")
    for name, row in r["per_kernel"].items():
        print(f"{name:<30} {row['arguments']:>4} {row['triton_dispatch_us']:12.2f} {row['direct_us']:8.2f}")
    s = r["step"]
    print(f"{r['model']} step ({r['layers']} layers, width ÷{r['width_divisor']}, {s['launches']} launches): "
          f"{s['triton_dispatch_ms']:.3f} ms of host time with Triton's dispatch, {s['direct_ms']:.3f} ms with "
          f"direct launches ({s['saved_us_per_launch']:.1f} µs less per launch), {s['replayed_ms']:.3f} ms with "
          f"recorded calls replayed")
    n = r["newton_schulz"]
    print(f"newton_schulz {'x'.join(map(str, n['shape']))} ({n['launches']} launches): {n['triton_dispatch_us']:.0f} µs "
          f"of host time per call with Triton's dispatch, {n['direct_us']:.0f} µs with direct launches, "
          f"{n['replayed_us']:.0f} µs replayed")


if __name__ == "__main__":
    main()
