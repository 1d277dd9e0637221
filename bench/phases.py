"""Where a ``Muon.step()`` spends its time, beside the floor its FLOPs and bytes set.

Phases: ``momentum`` (momentum → Nesterov → stack), ``ns <m>x<n>x<k> <backend>:<path>`` per bucket,
``update`` (decay + update), ``adamw``; for torch.optim.Muon, ``ns`` (its per-matrix Newton–Schulz)
and ``adamw``. One profiled run of a few steps after warm-up (torch.profiler), with
``record_function`` ranges put around those calls by wrapping them in this process only — the
package itself carries no instrumentation. Per phase: the device time of the kernels it launched
(GPU) and its host time; per step: the wall time, the sum of all kernel time, and the host gap
(wall minus kernel time: launches, Python, syncs — what a CUDA graph would remove).

The floor: the step's Newton–Schulz FLOPs at the bf16 matmul rate and its compulsory elementwise
bytes at the copy bandwidth, both measured on this device in the same run (METHOD.md's two numbers).
Bytes per element: momentum reads G and M and writes M and U; the update reads W and O and writes
W; AdamW reads p, g, m, v and writes p, m, v.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

import muon_kernels.optimizer as optimizer_module
from common import summarize, time_call
from muon_kernels import recurrence
from muon_kernels.bucket import Bucket
from muon_kernels.ns_config import resolve_ns_config

PREFIX = "muon::"


def _ranged(fn, name):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        label = name(*args) if callable(name) else name
        with record_function(PREFIX + label):
            return fn(*args, **kwargs)
    return wrapped


def _ns_label(bucket: Bucket, stack: torch.Tensor, *_) -> str:
    return f"ns {bucket.m}x{bucket.n}x{stack.shape[0]} {bucket.backend.NAME}:{bucket.path or 'default'}"


@contextlib.contextmanager
def instrumented():
    """Profiler ranges around the phases of our step and torch.optim.Muon's, for this block only."""
    import torch.optim._muon as torch_muon

    patches = [
        (Bucket, "momentum_stack", _ranged(Bucket.momentum_stack, "momentum")),
        (Bucket, "orthogonalize", _ranged(Bucket.orthogonalize, _ns_label)),
        (Bucket, "apply_update", _ranged(Bucket.apply_update, "update")),
        (optimizer_module, "adamw_step", _ranged(optimizer_module.adamw_step, "adamw")),
        (torch_muon, "_zeropower_via_newtonschulz", _ranged(torch_muon._zeropower_via_newtonschulz, "ns")),
        (torch.optim.AdamW, "step", _ranged(torch.optim.AdamW.step, "adamw")),
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, fn in patches:
            setattr(owner, attr, fn)
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def _device_us(event) -> float:
    return float(getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)))


def breakdown(step, device: torch.device, steps: int = 3) -> dict:
    """Per-step phase times (ms) of ``step`` (already warmed up): ``phases`` {name: {"device_ms",
    "host_ms", "calls"}}, ``wall_ms``, ``kernel_ms`` and ``host_gap_ms`` (GPU) for one step."""
    cuda = device.type == "cuda"
    wall = summarize(time_call(step, device=device, warmup=0, repeat=steps))["ms"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # One profiled step first, not counted: the profiler's own start-up lands in it.
    with instrumented(), profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps),
                                 acc_events=True) as prof:
        for _ in range(steps + 1):
            step()
            if cuda:
                torch.cuda.synchronize(device)
            prof.step()
    events = prof.key_averages()
    phases = {}
    for e in events:
        # A phase is its CPU range: host time, and the device time of the kernels launched inside it.
        # (On a GPU the profiler also lists a GPU-side copy of each range under the same name: a span
        # on the device timeline, gaps included, with no host time.)
        if e.key.startswith(PREFIX) and e.device_type == DeviceType.CPU:
            phases[e.key.removeprefix(PREFIX)] = {"device_ms": _device_us(e) / 1e3 / steps if cuda else None,
                                                  "host_ms": e.cpu_time_total / 1e3 / steps,
                                                  "calls": e.count // steps}
    out = {"wall_ms": wall, "phases": phases, "profiled_steps": steps}
    if cuda:
        # Kernel time once: the device's own events (a CPU op's self device time is its kernels' again,
        # and the GPU-side ranges are spans, not work), as torch's profiler table totals them.
        kernels = sum(float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
                      for e in events
                      if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)) / 1e3 / steps
        out.update(kernel_ms=kernels, host_gap_ms=max(wall - kernels, 0.0))
    return out


def ceilings(device: torch.device, warmup: int = 3, repeat: int = 10) -> dict:
    """The device's bf16 matmul rate (TFLOP/s, a square product) and copy bandwidth (GB/s, bytes
    read + written), measured now."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = summarize(time_call(lambda: torch.mm(a, b), device=device, warmup=warmup, repeat=repeat))["ms"]
    nbytes = 2**30 if device.type == "cuda" else 2**27
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = summarize(time_call(lambda: dst.copy_(src), device=device, warmup=warmup, repeat=repeat))["ms"]
    return {"bf16_mm_tflops": 2 * n**3 / mm / 1e9, "copy_gbps": 2 * nbytes / copy / 1e6,
            "mm_size": n, "copy_bytes": nbytes}


def floor(matrices: list[tuple[int, int]], vectors: list[int], param_bytes: int, ceiling: dict,
          ns_steps: int = 5) -> dict:
    """The step's floor (ms) from FLOPs and bytes: ``matrices`` (out, in) and ``vectors`` (AdamW
    sizes) of the whole model, ``param_bytes`` per parameter element, Keller's 5-step NS in bf16.
    Both Newton–Schulz counts: naive (4m²n + 2m³ per step) and with symmetric products (3m²n + m³)."""
    config = resolve_ns_config("keller", ns_steps, 1e-7)
    naive = sum(recurrence.flops(min(s), max(s), config, torch.bfloat16) for s in matrices)
    symmetric = sum(ns_steps * (3 * min(s) ** 2 * max(s) + min(s) ** 3) for s in matrices)
    elements = sum(r * c for r, c in matrices)
    ortho_bytes = 2  # bf16 O
    elementwise = elements * (4 * param_bytes + 2 * param_bytes + ortho_bytes)
    adamw = sum(vectors) * 7 * param_bytes
    rate, bandwidth = ceiling["bf16_mm_tflops"] * 1e12, ceiling["copy_gbps"] * 1e9
    out = {"ns_tflop_naive": naive / 1e12, "ns_tflop_symmetric": symmetric / 1e12,
           "elementwise_gb": elementwise / 1e9, "adamw_gb": adamw / 1e9,
           "ns_ms_naive": naive / rate * 1e3, "ns_ms_symmetric": symmetric / rate * 1e3,
           "elementwise_ms": elementwise / bandwidth * 1e3, "adamw_ms": adamw / bandwidth * 1e3}
    out["floor_ms"] = out["ns_ms_symmetric"] + out["elementwise_ms"] + out["adamw_ms"]
    out["floor_ms_naive"] = out["ns_ms_naive"] + out["elementwise_ms"] + out["adamw_ms"]
    return out
