"""Newton–Schulz throughput per shape and batch: our backends against the references a user would
otherwise run, side by side on the same inputs in one process.

Implementations (names as in the JSON):
- ``ours-<backend>``: the backend's batched orthogonalize on the whole stack (one call per bucket),
- ``ours-<backend>-gram``: the same with Gram Newton–Schulz (same coefficients and steps, default
  restarts); ``ours-<backend>-aol``: the ``turbo`` preset (AOL preconditioning, 4 steps) — its
  TFLOP/s column still counts the 5 standard steps, so it reads as the speed of reaching the result,
- ``ours-<backend>-cublas`` (GPU): the backend's normalization kernels, then cuBLAS's GEMMs (the
  measuring mode's "cublas" path); ``ours-triton-symmetric-cublas``: the Triton symmetric products
  with cuBLAS's a·X + B·X (its "symmetric-cublas" path); ``ours-cuda-sm75``: the CUDA extension
  forced onto its Turing path,
- ``torch.optim.Muon``: torch's own routine, ``torch.optim._muon._zeropower_via_newtonschulz``,
  one matrix at a time (that is how torch.optim.Muon calls it),
- ``cublas-recurrence``: the plain recurrence a user writes, ``bmm`` per term on the stack,
- ``compiled-recurrence``: the same function under ``torch.compile`` (CUDA only: on a CPU the
  inductor compile time would swamp a smoke run),
- ``gram-newton-schulz`` (Dao-AILab, PyPI 0.1.6) when importable: its ``GramNewtonSchulz`` on the
  same coefficients and restart [2], kernels only where its ``quack`` dependency imports, no
  torch.compile (it iterates in fp16 whatever the input; on a CPU fp16 GEMMs are slow, so that row
  shows the package's CPU cost, not its GPU one),
- another installed peer package, when one is importable (never a dependency).

Effective TFLOP/s = naive FLOPs (DESIGN.md §3: 4m²n + 2m³ per step and matrix) / time; "peak" is
a plain bf16 ``torch.mm`` of an m×n by n×m product (the Gram product of the same shape) measured
here, so "of peak" says how close the whole iteration comes to the GEMM the device does best.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

import muon_kernels as mk

from common import summarize, time_call, with_environment
from muon_kernels.backends import available_backends, select_backend
from muon_kernels.ns_config import resolve_ns_config

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
STEPS = 5
CONFIG = resolve_ns_config(COEFFICIENTS, STEPS, 1e-7)
VARIANTS = {"": CONFIG, "-gram": resolve_ns_config(COEFFICIENTS, STEPS, 1e-7, "gram"),
            "-aol": resolve_ns_config("turbo", None, 1e-7)}

# Oriented shapes (m ≤ n) of DESIGN.md §4's matrices, beside the squares.
MODEL_SHAPES = [(768, 2304), (768, 3072), (1024, 3072), (1024, 4096), (1600, 4800), (1600, 6400), (2048, 8192),
                (4096, 11008)]
SQUARES = [256, 512, 1024, 2048, 4096, 8192]
BATCHES = [1, 4, 16, 48]
# A (shape, batch) point is skipped above this many naive FLOPs per call (~1 s on an H100), so the
# sweep fits the device budget: 8192² runs at batch 1 and 4, LLaMA-7B's (4096, 11008) up to 16.
MAX_CALL_FLOPS = 1e15
CPU_SHAPES = [(64, 64), (128, 128), (256, 256), (96, 384)]
CPU_BATCHES = [1, 4]

# Peers: importable module → function names tried, each called as fn(matrix) on one matrix.
PEERS = {"flash_muon": ("fast_newtonschulz", "newton_schulz")}


def naive_flops(m: int, n: int, batch: int, steps: int = STEPS) -> float:
    return batch * steps * (4 * m * m * n + 2 * m ** 3)


def plain_recurrence(stack: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What a user writes: normalize, cast (bf16 by default), one bmm per term (the "cuBLAS
    recurrence")."""
    a, b, c = COEFFICIENTS
    x = stack / stack.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)
    x = x.to(dtype)
    for _ in range(STEPS):
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x


def torch_muon_routine():
    """torch.optim.Muon's private NS routine, or None on a torch whose layout differs."""
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz
    except ImportError:
        return None
    def routine(stack):  # one matrix at a time, as torch.optim.Muon steps; one matrix's result is not copied
        if stack.shape[0] == 1:  # (a batch-1 call is a few hundred µs: a stacking copy would be a few % of it)
            return _zeropower_via_newtonschulz(stack[0], COEFFICIENTS, STEPS, 1e-7).unsqueeze(0)
        return torch.stack([_zeropower_via_newtonschulz(g, COEFFICIENTS, STEPS, 1e-7) for g in stack])
    return routine


def gram_newton_schulz_peer(coefficients, restarts, device: torch.device):
    """Dao-AILab's GramNewtonSchulz on ``coefficients`` (per-step list) and ``restarts``, or None."""
    try:
        from gram_newton_schulz import GramNewtonSchulz
    except ImportError:
        return None
    kernels = device.type == "cuda" and importlib.util.find_spec("quack") is not None
    return GramNewtonSchulz(ns_use_kernels=kernels, ns_coefficients=[list(c) for c in coefficients],
                            gram_newton_schulz_reset_iterations=list(restarts), compile_kwargs=None)


def _peers(device: torch.device) -> tuple[list[tuple[str, object]], list[str]]:
    found, notes = [], []
    gns = gram_newton_schulz_peer(CONFIG.coefficients, (2,), device)
    if gns is not None:
        found.append(("gram-newton-schulz", gns))
    for module, names in PEERS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        fn = next((getattr(mod, n) for n in names if callable(getattr(mod, n, None))), None)
        if fn is None:
            notes.append(f"{module} is installed but has none of {names}")
            continue
        found.append((module, lambda stack, fn=fn: torch.stack([fn(g) for g in stack])))
    return found, notes


def implementations(device: torch.device, compiled: bool = True):
    """(name, fn(stack) -> orthogonalized stack) for everything that runs here, and notes.
    ``compiled``: the torch.compile row (its inductor compile costs 10–40 s per shape, which a
    budgeted run spends on rows no target reads)."""
    impls = []
    for name, (ok, _) in available_backends(device).items():
        if ok:
            backend, _ = select_backend(name, device)
            for suffix, config in VARIANTS.items():
                impls.append((f"ours-{name}{suffix}", lambda s, b=backend, c=config: b.orthogonalize(s, c, torch.bfloat16)))
    if device.type == "cuda":
        # The measuring mode's "cublas" paths (normalization kernels, then cuBLAS's GEMMs), alone,
        # and the Triton backend's "symmetric-cublas" (its symmetric products, cuBLAS's a·X + B·X).
        for name, path in (("triton", "cublas"), ("triton", "symmetric-cublas"), ("cuda", "cublas")):
            if available_backends(device)[name][0]:
                backend, _ = select_backend(name, device)
                impls.append((f"ours-{name}-{path}",
                              lambda s, b=backend, p=path: b.orthogonalize(s, CONFIG, torch.bfloat16, path=p)))
    if device.type == "cuda" and available_backends(device)["cuda"][0] and torch.cuda.get_device_capability(device)[0] >= 8:
        # The Turing code path (fp16 mma.sync, register-staged loads) on this newer GPU: the only
        # place it can be timed here (issue 25 targets both CUDA paths against cuBLAS).
        backend, _ = select_backend("cuda", device)
        impls.append(("ours-cuda-sm75", lambda s, b=backend: _on_sm75_path(lambda: b.orthogonalize(s, CONFIG, torch.bfloat16))))
    if device.type == "cuda":
        # What a user gets: backend="auto" measures every path on its first call for this shape (the
        # warm-up calls) and keeps the fastest; with ns_algorithm="auto", Gram NS competes too.
        impls.append(("ours-auto", lambda s: mk.orthogonalize(s, ns_dtype=torch.bfloat16)))
        impls.append(("ours-auto-gram", lambda s: mk.orthogonalize(s, ns_dtype=torch.bfloat16, ns_algorithm="auto")))
    notes = []
    torch_muon = torch_muon_routine()
    if torch_muon is not None:
        impls.append(("torch.optim.Muon", torch_muon))
    else:
        notes.append(f"torch.optim.Muon: torch {torch.__version__} has no torch.optim._muon._zeropower_via_newtonschulz")
    impls.append(("cublas-recurrence", plain_recurrence))
    if device.type != "cuda":
        notes.append("compiled-recurrence: not run on a CPU (inductor compile time would dominate a smoke run)")
    elif not compiled:
        notes.append("compiled-recurrence: left out of a budgeted run (an inductor compile per shape)")
    else:
        # dynamo counts recompiles per code object across calls: past its limit (8 shapes) the row
        # would silently run eagerly, so each run of points starts from an empty cache
        torch._dynamo.reset()
        impls.append(("compiled-recurrence", torch.compile(plain_recurrence, dynamic=False)))
    peers, peer_notes = _peers(device)
    return impls + peers, notes + peer_notes


def _on_sm75_path(fn):
    """fn() with the CUDA backend forced onto its sm75 code path (MUON_KERNELS_CUDA_PATH=sm75)."""
    from muon_kernels.backends.cuda_backend import PATH_ENV

    return with_environment(PATH_ENV, "sm75", fn)


def flush_l2(device: torch.device):
    """A write over a buffer larger than any L2, so each NS timing starts from a cold cache."""
    if device.type != "cuda":
        return None
    scratch = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return scratch.zero_


def mm_peak_tflops(m: int, n: int, device: torch.device, warmup: int, repeat: int) -> float:
    x = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, m, device=device, dtype=torch.bfloat16)
    ms = summarize(time_call(lambda: torch.mm(x, y), device=device, warmup=warmup, repeat=repeat))["ms"]
    return 2 * m * m * n / (ms * 1e-3) / 1e12


def points(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    if device.type != "cuda":
        return [(m, n, b) for (m, n) in CPU_SHAPES for b in CPU_BATCHES]
    shapes = [(s, s) for s in SQUARES] + MODEL_SHAPES
    batches = BATCHES[:2] if quick else BATCHES
    return [(m, n, b) for (m, n) in shapes for b in batches if naive_flops(m, n, b) <= MAX_CALL_FLOPS]


def run(device: torch.device, *, quick: bool, warmup: int, repeat: int, progress,
        todo: list[tuple[int, int, int]] | None = None, compiled: bool = True) -> tuple[list[dict], list[str]]:
    """Every (m, n, batch) of ``todo`` (default: the whole sweep, ``points``) for every implementation
    (``compiled``: with the torch.compile row)."""
    impls, notes = implementations(device, compiled)
    flush = flush_l2(device)
    rows = []
    todo = points(device, quick) if todo is None else todo
    peaks: dict[tuple[int, int], float] = {}
    for i, (m, n, batch) in enumerate(todo):
        g = torch.Generator(device="cpu").manual_seed(m * 7919 + n * 31 + batch)
        stack = torch.randn(batch, m, n, generator=g).to(device)
        if (m, n) not in peaks:
            peaks[(m, n)] = mm_peak_tflops(m, n, device, warmup, repeat)
        for name, fn in impls:
            progress(f"ns {i + 1}/{len(todo)} {m}x{n} batch {batch} {name}")
            try:
                samples = time_call(lambda: fn(stack), device=device, warmup=warmup, repeat=repeat, before=flush)
            except Exception as e:  # a peer with an unexpected signature: recorded, not fatal
                notes.append(f"{name} failed on {m}x{n} batch {batch}: {type(e).__name__}: {e}")
                continue
            stats = summarize(samples)
            tflops = naive_flops(m, n, batch) / (stats["ms"] * 1e-3) / 1e12
            rows.append({"shape": [m, n], "batch": batch, "dtype": "bfloat16", "impl": name, **stats,
                         "tflops": tflops, "mm_peak_tflops": peaks[(m, n)],
                         "fraction_of_peak": tflops / peaks[(m, n)], "samples": samples})
    return rows, notes


def speedups(rows: list[dict]) -> list[dict]:
    """Per (shape, batch): each of ours against the best reference (the fastest non-ours impl); the
    -gram/-aol rows count too (a user may pick them), each named by its own impl."""
    out = []
    keys = sorted({(tuple(r["shape"]), r["batch"]) for r in rows})
    for key in keys:
        here = [r for r in rows if (tuple(r["shape"]), r["batch"]) == key]
        refs = [r for r in here if not r["impl"].startswith("ours-")]
        if not refs:
            continue
        best = min(refs, key=lambda r: r["ms"])
        for r in here:
            if r["impl"].startswith("ours-"):
                out.append({"shape": list(key[0]), "batch": key[1], "impl": r["impl"], "best_reference": best["impl"],
                            "speedup": best["ms"] / r["ms"]})
    return out
