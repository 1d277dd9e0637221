"""The functional ``orthogonalize``: Newton–Schulz on a matrix or a batch, through the backend registry."""

from __future__ import annotations

import torch

from .backends import measured, select_backend
from .bucket import Bucket
from .ns_config import CoefficientSpec, check_ns_dtype, resolve_ns_config
from .recurrence import choose_algorithm


@torch.no_grad()  # the iteration has no derivative here: a G that requires grad gives a plain result
def orthogonalize(
    G: torch.Tensor,
    *,
    ns_steps: int | None = None,
    ns_coefficients: CoefficientSpec = "keller",
    eps: float = 1e-7,
    ns_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    ns_algorithm: str = "standard",
    ns_normalization: str | None = None,
    ns_gram_restarts: tuple[int, ...] | None = None,
    dispatch: str = "auto",
) -> torch.Tensor:
    """Approximate the polar factor of ``G`` by Newton–Schulz; same shape and dtype as ``G``.

    ``G`` is a matrix, or a batch of matrices over its leading dims. Each matrix is normalized and
    iterated on its own, so a NaN in one never reaches another. Tall matrices are iterated as their
    transpose (m <= n). The norm is overflow/underflow-safe (eps = 0 orthogonalizes a 1e-30
    gradient — down to the normal range's end, ~1e-38, not subnormal ones; a 1e30 one is not
    zeroed), and the iteration starts from one canonical contiguous layout, so the result does not
    depend on ``G``'s strides. The result never requires grad (the
    iteration is not differentiated; a ``G`` that requires grad is read as its values).

    ``ns_steps=None`` runs the preset's own number of steps (5; "turbo": 4). ``ns_algorithm``:
    "standard", "gram" (Gram Newton–Schulz: iterate on the m×m Gram matrix, restarted before the
    steps in ``ns_gram_restarts``; None: per-dtype defaults) or "auto" (Gram from an aspect
    ratio per device and dtype: measured on CPUs, the FLOP model's on GPUs). ``ns_normalization``:
    "frobenius" or "aol" (Turbo-Muon's diagonal preconditioning); None: the preset's own. docs/newton_schulz.md has the math and the measurements.
    ``dispatch``: how ``backend="auto"`` chooses on a GPU — "auto" or "measure" (time every path on
    the first call for this shape, persist the fastest: muon_kernels/backends/measured.py) or "table".
    """
    if not isinstance(G, torch.Tensor) or G.ndim < 2:
        raise ValueError(
            f"orthogonalize: G must be a tensor with at least 2 dims (a matrix or a batch of "
            f"matrices), got {tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}"
        )
    if G.is_complex() or not G.is_floating_point():
        raise ValueError(f"orthogonalize: G must be a real floating-point tensor, got {G.dtype}")
    config = resolve_ns_config(ns_coefficients, ns_steps, eps, ns_algorithm, ns_normalization, ns_gram_restarts)
    check_ns_dtype(ns_dtype)
    measured.mode(dispatch)
    rows, cols = G.shape[-2:]
    if G.numel() == 0:
        return torch.zeros_like(G)
    stack = G.reshape(-1, rows, cols)
    if rows > cols:
        stack = stack.mT
    m, n = min(rows, cols), max(rows, cols)
    impl, why = select_backend(backend, G.device, m, n, ns_dtype)
    resolved, _ = choose_algorithm(config, m, n, ns_dtype, G.device)
    bucket = Bucket(G.device, stack.dtype, m, n, resolved, ns_dtype, True, "ema", impl, why,
                    request=config if backend == "auto" else None)
    measured.resolve_one(bucket, stack.shape[0], dispatch)
    out = bucket.orthogonalize(stack, None)
    if rows > cols:
        out = out.mT
    return out.reshape(G.shape).to(G.dtype)
