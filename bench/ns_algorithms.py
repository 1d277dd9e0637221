"""Newton–Schulz algorithms side by side: standard, Gram, and AOL-preconditioned (Turbo, 4 steps),
on the model shapes where the choice matters, with their accuracy beside their speed.

Per (shape, iteration dtype), in one process on the same input, for every backend that runs here:
- ``standard``: keller, 5 steps (the default recurrence),
- ``gram``: the same coefficients and steps as Gram NS (default restarts for the dtype),
- ``turbo``: AOL preconditioning + Turbo's 4 steps,
- ``standard-4``: keller, 4 steps without AOL (what dropping a step costs without preconditioning),
- ``gram-newton-schulz``: Dao-AILab's package on the same coefficients, restart [2], where importable
  (it always iterates in fp16; skipped on a CPU, where fp16 GEMMs are ~80× slower than bf16).

Timing is interleaved: each round times every implementation once, in turn, so drift on a shared
machine hits all of them alike (medians over rounds). Each row has the median time, the speed-up against ``standard`` of the same backend and dtype
(``speedup``), the naive FLOPs (muon_kernels.recurrence.flops) and the relative Frobenius distance
to the fp64 SVD polar factor (``polar_error``) and to the fp64 standard recurrence
(``recurrence_error``: Gram's only error source is rounding, so it is compared to the recurrence it
reorganizes).
"""

from __future__ import annotations

import torch

from common import summarize, time_call
from muon_kernels import recurrence
from muon_kernels.backends import available_backends, select_backend
from muon_kernels.backends.torch_backend import MATMUL_OPS, normalize
from muon_kernels.ns_config import resolve_ns_config
from newton_schulz import gram_newton_schulz_peer

# (m, n, iteration dtype): the GPT-2 small and LLaMA-1B MLP shapes and squares of the same widths.
# Plus 768 × (1.5, 2, 3)·768 on a CPU: the aspect ratios behind ns_algorithm="auto"'s thresholds.
CPU_POINTS = [(768, 3072, "float32"), (1024, 4096, "float32"), (768, 768, "float32"), (1024, 1024, "float32"),
              (768, 3072, "bfloat16"), (1024, 4096, "bfloat16"), (768, 768, "bfloat16")] + [
              (768, n, dt) for n in (1152, 1536, 2304) for dt in ("float32", "bfloat16")]
GPU_POINTS = [(m, n, dt) for m, n in ((1024, 4096), (2048, 8192), (4096, 11008), (4096, 4096), (2048, 2048))
              for dt in ("bfloat16", "float16")]
CONFIGS = {
    "standard": resolve_ns_config("keller", None, 1e-7),
    "gram": resolve_ns_config("keller", None, 1e-7, "gram"),
    "turbo": resolve_ns_config("turbo", None, 1e-7),
    "standard-4": resolve_ns_config("keller", 4, 1e-7),
}


def points(device: torch.device, divisor: int = 1) -> list[tuple[int, int, str]]:
    """The device's points, every width divided by ``divisor`` (a smoke run of the section)."""
    return [(m // divisor, n // divisor, dt) for m, n, dt in (GPU_POINTS if device.type == "cuda" else CPU_POINTS)]


def _references(G: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp64 polar factor (SVD) and fp64 standard recurrence of one m×n (m <= n) matrix."""
    G64 = G.double().cpu()
    U, _, Vh = torch.linalg.svd(G64, full_matrices=False)
    standard = CONFIGS["standard"]
    X = normalize(G64[None], standard, torch.float64)
    return {"polar": U @ Vh, "recurrence": recurrence.standard(X, standard.coefficients, MATMUL_OPS)[0]}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double().cpu().reshape(ref.shape)
    return float((x - ref).norm() / ref.norm())


def run(device: torch.device, *, warmup: int, repeat: int, progress, todo=None) -> list[dict]:
    rows = []
    backends = [name for name, (ok, _) in available_backends(device).items() if ok]
    for m, n, dtype_name in points(device) if todo is None else todo:
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(m * 131 + n)
        G = torch.randn(1, m, n, generator=g)
        refs = _references(G[0])
        stack = G.to(device)
        impls = [(backend, name, lambda s, b=select_backend(backend, device)[0], c=config: b.orthogonalize(s, c, dtype),
                  recurrence.flops(m, n, config, dtype))
                 for backend in backends for name, config in CONFIGS.items()]
        peer = gram_newton_schulz_peer(CONFIGS["standard"].coefficients, (2,), device) if device.type == "cuda" else None
        if peer is not None:
            restart2 = resolve_ns_config("keller", None, 1e-7, "gram", None, (2,))
            impls.append(("gram-newton-schulz", "gram", peer, recurrence.flops(m, n, restart2, dtype)))
        progress(f"ns algorithms {m}x{n} {dtype_name}: {len(impls)} implementations, {repeat} interleaved rounds")
        samples: list[list[float]] = [[] for _ in impls]
        for round_ in range(repeat):
            for (_, _, fn, _), times in zip(impls, samples):
                times += time_call(lambda: fn(stack), device=device, warmup=warmup if round_ == 0 else 0, repeat=1)
        base: dict[str, float] = {}
        for (backend, name, fn, flops), times in zip(impls, samples):
            stats = summarize(times)
            out = fn(stack)
            if name == "standard":
                base[backend] = stats["ms"]
            rows.append({"shape": [m, n], "dtype": dtype_name, "backend": backend,
                         "algorithm": name, **stats, "flops": flops,
                         "polar_error": _rel(out, refs["polar"]), "recurrence_error": _rel(out, refs["recurrence"]),
                         "samples": times})
        for r in rows[-len(impls):]:
            ref_ms = base.get(r["backend"], min(base.values()) if base else None)
            r["speedup"] = ref_ms / r["ms"] if ref_ms else None
    return rows
