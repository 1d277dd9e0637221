"""Triton backend: the fused, batched kernels of ``muon_kernels.triton_kernels``.

Per bucket: one fused momentum → Nesterov → stack launch; Newton–Schulz either in one kernel
(matrices that fit one CTA) or with the symmetric kernels (2 + 3·steps launches) — or, where the
measuring mode finds it faster, the two normalization launches then cuBLAS's GEMMs ("cublas"), or
cuBLAS for a·X + B·X only ("symmetric-cublas"); one fused decay-and-update launch. Importing this
module imports triton; the registry only does so when the backend is asked about.
"""

from __future__ import annotations

import torch

from .. import momentum_precision, variants, workspace
from ..bucket import Bucket
from ..ns_config import NSConfig
from ..triton_kernels.fused_update import Layout, int_table, make_layout
from ..triton_kernels.ops import (fused_apply_update_launch, fused_momentum_launch, newton_schulz_launch,
                                  variant_factors_launch, variant_statistics_launch)
from ..triton_kernels.small_newton_schulz import fits_device
from . import torch_backend
from ..scalars import momenta, update_scalars
from .fused import fusable, row_stride, same_layout

NAME = "triton"


def small_path(m: int, n: int, ns_dtype: torch.dtype, device: torch.device) -> bool:
    return fits_device(m, n, ns_dtype, device)


def _one_kernel(m: int, n: int, ns_dtype: torch.dtype, device: torch.device, config: NSConfig | None) -> bool:
    """The one-kernel small path runs only the plain recurrence; Gram and AOL go through the
    symmetric kernels at every size."""
    return (config is None or config.plain) and small_path(m, n, ns_dtype, device)


def paths(m: int, n: int, ns_dtype: torch.dtype, device: torch.device, config: NSConfig | None = None) -> tuple[str, ...]:
    """The kernel paths that can orthogonalize such a bucket, this backend's own choice first. On a
    GPU also, for the measuring mode to time: "cublas", the normalization kernels with cuBLAS's
    GEMMs (torch.optim.Muon's cuBLAS recurrence beat the symmetric kernels 2.4× at 1024×4096 on the
    H200, and the torch backend's normalization costs ~15 launches more); and "symmetric-cublas":
    the symmetric kernels' products (X·Xᵀ, b·A + c·A·A; Gram NS's m×m ones) with cuBLAS's
    a·X + B·X (Gram NS: Q·X) — ``symmetric_cublas_newton_schulz``."""
    own = ("small", "symmetric") if _one_kernel(m, n, ns_dtype, device, config) else ("symmetric",)
    return own + (("cublas", "symmetric-cublas") if device.type == "cuda" else ())


def kernel_path(m: int, n: int, ns_dtype: torch.dtype, device: torch.device,
                config: NSConfig | None = None, path: str | None = None) -> tuple[str, str]:
    if path == "cublas":
        return "cublas", ("normalization kernels (2 launches), then cuBLAS's batched GEMMs for the products; fused "
                          "momentum and update")
    if path == "symmetric-cublas":
        return "symmetric-cublas", ("normalization kernels (2 launches), X·Xᵀ and b·A+c·A·A (Gram NS: its m×m "
                                    "products) on the symmetric kernel (upper tiles, mirrored), a·X+B·X (Gram NS: "
                                    "Q·X) on cuBLAS's batched GEMM; fused momentum and update")
    if config is not None and config.algorithm == "gram":
        return "symmetric-gram", ("Gram NS driver: X·Xᵀ, P = b·R + c·R·R + a·I, Q·P and P·(R·P) on the symmetric "
                                  "kernel (upper tiles, mirrored; split-K when few tiles), restarts and the final "
                                  "Q·X on the a·X + B·X kernel; 17 products for 5 steps")
    if (path or paths(m, n, ns_dtype, device, config)[0]) == "small":
        return "small", "whole matrix in one CTA: all NS steps in one kernel; fused momentum and update; 5 launches"
    return "symmetric", (
        "fused momentum→stack, triangular-grid X·Xᵀ and b·A+c·A·A (upper tiles, mirrored store), "
        "a·X+B·X epilogue, fused update; 4 + 3·steps launches per bucket; products with few output tiles split "
        "along K and reduce in the same launch"
    )


def orthogonalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype, path: str | None = None,
                  consume: bool = False) -> torch.Tensor:
    """``consume``: the caller gives the stack up, and its memory serves as a work buffer (the result
    may lie in it)."""
    _, m, n = stack.shape
    flat = [float(v) for step in config.coefficients for v in step]
    path = path or paths(m, n, ns_dtype, stack.device, config)[0]
    return newton_schulz_launch(stack, flat, config.eps, config.norm_scale, config.norm_offset, ns_dtype, path,
                                config.normalization, config.algorithm, list(config.gram_restarts(ns_dtype)),
                                consume=consume)


def _layout(bucket: Bucket) -> Layout:
    if "layout" not in bucket.cache:
        views = [(e.view.batch, e.view.rows, e.view.cols, bucket.transposed_in_stack(e), variants.neurons(e.view)[1],
                  row_stride(e)) for e in bucket.entries]
        bucket.cache["layout"] = make_layout(views, bucket.device)
    return bucket.cache["layout"]


def momentum_stack(bucket: Bucket, grads, bufs, groups: list[dict], state=None) -> torch.Tensor:
    """One launch: momentum, Nesterov and the (transposing) copy into the stack."""
    low = bucket.low_precision
    if (not (fusable(grads) and (fusable(bufs) or low.int8)) or len({g.dtype for g in grads}) != 1
            or not (same_layout(bucket, grads) and same_layout(bucket, bufs))
            or (low.int8 and not momentum_precision.kernel_blocks(bucket))
            or not momentum_precision.kernel_bits(bucket)):
        return torch_backend.momentum_stack(bucket, grads, bufs, groups, state)
    stack = workspace.empty(bucket.stack_shape, dtype=bucket.dtype, device=bucket.device)
    scales, steps, seeds = momentum_precision.state_tensors(bucket, state) if low.active else ([], [], [])
    fused_momentum_launch(grads, bufs, momenta(bucket, groups), *_layout(bucket), stack, bucket.momentum_form == "ema",
                      bucket.nesterov, scales, steps, seeds if low.stochastic else [])
    return stack


def apply_update(bucket: Bucket, ortho: torch.Tensor, groups: list[dict], state=None) -> None:
    """One launch: W = W·(1 - lr·wd) - lr·scale·O for every parameter of the bucket (the decay only
    where W·O >= 0 with cautious weight decay)."""
    params = [e.target for e in bucket.entries]
    if not fusable(params) or len({p.dtype for p in params}) != 1:
        return torch_backend.apply_update(bucket, ortho, groups, state)
    alphas, decays = update_scalars(bucket, groups)
    row_scale = gains = shrink = None
    if bucket.variant.active:
        row_scale, gains, shrink = _variant_factors(bucket, ortho, params, alphas, state)
    fused_apply_update_launch(params, alphas, decays, *_layout(bucket), ortho, bucket.cautious, row_scale, gains,
                              shrink)


def _variant_factors(bucket: Bucket, ortho: torch.Tensor, params, alphas: torch.Tensor, state):
    """One statistics launch (NorMuon's v updated in place), then one launch for the per-matrix
    scalars from the (K, blocks, 4) partial sums: (s per neuron or None, g, c or None), all on the
    device."""
    v = bucket.variant
    vs, radii = variants.state_tensors(bucket, state)
    table = int_table(variants.statistics_table(bucket, params, vs), bucket.device)  # pinned during capture
    row_scale = workspace.empty((bucket.matrices, bucket.n), dtype=torch.float32, device=bucket.device) \
        if v.normuon else None
    partials = variant_statistics_launch(ortho, params, vs, table, row_scale, v.normuon, v.hyperball, v.beta2,
                                     v.normuon_eps)
    radius = variants.radius_vector(bucket, radii) if radii else None
    gains, shrink = variant_factors_launch(partials, variants.per_matrix(bucket, alphas) if v.hyperball else None,
                                           radius, v.normuon, v.hyperball, v.normuon_eps, v.hyperball_eps)
    return row_scale, gains, shrink if v.hyperball else None
