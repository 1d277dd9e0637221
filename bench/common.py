"""Shared benchmark plumbing: model shape sets, timing, environment facts, result files."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

# DESIGN.md §4: nn.Linear.weight shapes (out, in) per layer; Muon parameters only.
MODELS = {
    "gpt2-small": {"d": 768, "layers": 12, "ffn": 4 * 768},
    "gpt2-medium": {"d": 1024, "layers": 24, "ffn": 4 * 1024},
    "gpt2-xl": {"d": 1600, "layers": 48, "ffn": 4 * 1600},
    "llama-1b": {"d": 2048, "layers": 16, "ffn": 8192},
    "llama-7b": {"d": 4096, "layers": 32, "ffn": 11008},
}


def layer_shapes(model: str, width_divisor: int = 1) -> tuple[list[tuple[int, int]], list[int]]:
    """(matrix shapes, vector sizes) of one layer: Muon matrices, and the biases/norms AdamW steps."""
    spec = MODELS[model]
    d, f = spec["d"] // width_divisor, spec["ffn"] // width_divisor
    if model.startswith("gpt2"):
        return [(3 * d, d), (d, d), (f, d), (d, f)], [3 * d, d, f, d, d, d, d, d]
    return [(d, d)] * 4 + [(f, d), (f, d), (d, f)], [d, d]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def time_call(fn, *, device: torch.device, warmup: int, repeat: int, before=None) -> list[float]:
    """Per-repetition milliseconds: CUDA events on a GPU, wall clock (perf_counter) on a CPU.
    ``before`` (e.g. an L2 flush) runs ahead of each repetition, outside the timed region, and is
    waited for: were it still running when the start event is queued, the host would enqueue ``fn``
    meanwhile, and a host-bound call would be timed as max(device time, host time − flush time)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            if before is not None:
                before()
                torch.cuda.synchronize(device)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def each_row(items, measure, device: torch.device, on_error=None):
    """``measure(name, build)`` for each (name, build) of ``items``, yielding its row as it is done. A
    row that raises is handed to ``on_error(name, exc)`` and the next row runs (None: the exception
    propagates): in a one-shot GPU window a backend's failure must not cost the rows after it. After
    a failure the device's cached memory is released, once the traceback no longer holds the row's
    tensors."""
    for name, build in items:
        try:
            row = measure(name, build)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(name, exc)
            row = None
        if row is not None:
            yield row
        elif device.type == "cuda":
            gc.collect()  # a traceback in a reference cycle (Dynamo's errors) would still hold the row's tensors
            try:
                torch.cuda.empty_cache()
            except Exception:  # a sticky CUDA error: the next row reports its own failure
                pass


def with_environment(name: str, value: str, fn):
    """fn() with the environment variable ``name`` set to ``value``, restored afterwards (the
    kernels read their switches per call: the debug fill, the CUDA code path)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def through_triton_dispatch(fn):
    """fn() with every Triton launch made through ``kernel[grid]`` (direct launches off): the rows
    that measure what triton_kernels/launch.py saves."""
    from muon_kernels.triton_kernels import launch

    with launch.direct_launches(False):
        return fn()


def bf16_slowdown(size: int = 512) -> float:
    """How many times longer a ``size``² bf16 matmul takes than an fp32 one on this CPU (best of 3
    each): about 0.5–2 where bf16 is native (AVX512_BF16, AMX, ARM BF16), tens where it is emulated
    (a 2-core EPYC without AVX-512: one bf16 768×3072 Newton–Schulz call took ~20 s against 0.2 s)."""
    a32 = torch.randn(size, size)
    a16 = a32.bfloat16()
    best = {}
    for a in (a32, a16, a32, a16, a32, a16):
        start = time.perf_counter()
        a @ a
        best[a.dtype] = min(best.get(a.dtype, float("inf")), time.perf_counter() - start)
    return best[torch.bfloat16] / best[torch.float32]


def summarize(samples: list[float]) -> dict:
    return {"ms": statistics.median(samples), "p20": percentile(samples, 0.2), "p80": percentile(samples, 0.8)}


COMMIT_ENV = "MUON_KERNELS_COMMIT"  # a copy of the tree without .git (a lent GPU machine's) names its commit here


COMMIT_PATTERN = re.compile(r"[0-9a-f]{7,40}(-dirty)?")


def git_commit() -> str:
    if os.environ.get(COMMIT_ENV):
        # It names result files: a short or full sha (git describe --always --dirty), nothing else.
        given = os.environ[COMMIT_ENV]
        if not COMMIT_PATTERN.fullmatch(given):
            raise ValueError(f"{COMMIT_ENV}={given!r}: give the tree's commit as `git rev-parse --short HEAD` "
                             "prints it (7 to 40 hex digits), with -dirty for a tree with changes")
        return given
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = list(torch.cuda.get_device_capability(device))
        try:
            versions["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, check=True
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            versions["driver"] = None
    else:
        name = _cpu_name()
        capability = None
        versions["driver"] = None
    return {"device": name, "capability": capability, "versions": versions, "commit": git_commit()}


def write_results(result: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9._-]+", "-", result["device"]).strip("-").lower()
    date = _dt.date.today().isoformat()
    path = out_dir / f"{device}-{date}-{result['commit']}.json"
    tmp = path.with_suffix(".tmp")  # rewritten after every row: a run killed mid-write keeps the last whole one
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return path


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])
