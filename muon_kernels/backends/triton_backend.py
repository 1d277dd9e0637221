"""Triton backend: the fused, batched kernels of ``muon_kernels.triton_kernels``.

Per bucket: one fused momentum → Nesterov → stack launch; Newton–Schulz either in one kernel
(matrices that fit one CTA) or with the symmetric kernels (2 + 3·steps launches); one fused
decay-and-update launch. Importing this module imports triton;
the registry only does so when the backend is asked about.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..orthogonalize import NSConfig
from ..triton_kernels.fused_update import Layout, make_layout
from ..triton_kernels.ops import fused_apply_update_op, fused_momentum_op, newton_schulz_op
from ..triton_kernels.small_newton_schulz import fits_device
from . import torch_backend

if TYPE_CHECKING:
    from ..plan import Bucket

NAME = "triton"


def small_path(m: int, n: int, ns_dtype: torch.dtype, device: torch.device) -> bool:
    return fits_device(m, n, ns_dtype, device)


def kernel_path(m: int, n: int, ns_dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    if small_path(m, n, ns_dtype, device):
        return "small", "whole matrix in one CTA: all NS steps in one kernel; fused momentum and update; 5 launches"
    return "symmetric", (
        "fused momentum→stack, triangular-grid X·Xᵀ and b·A+c·A·A (upper tiles, mirrored store), "
        "a·X+B·X epilogue, fused update; 4 + 3·steps launches per bucket"
    )


def orthogonalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype) -> torch.Tensor:
    _, m, n = stack.shape
    flat = [float(v) for step in config.coefficients for v in step]
    return newton_schulz_op(stack, flat, config.eps, config.norm_scale, config.norm_offset, ns_dtype,
                            small_path(m, n, ns_dtype, stack.device))


def _layout(bucket: Bucket) -> Layout:
    if "layout" not in bucket.cache:
        views = [(e.view.batch, e.view.rows, e.view.cols, e.view.transposed) for e in bucket.entries]
        bucket.cache["layout"] = make_layout(views, bucket.device)
    return bucket.cache["layout"]


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fusable(tensors) -> bool:
    """The fused kernels address tensors as flat contiguous memory and compute in fp32, so
    non-contiguous (channels_last, strided) or fp64 tensors take the torch path."""
    return all(t.is_contiguous() and t.dtype in _FUSED_DTYPES for t in tensors)


def momentum_stack(bucket: Bucket, grads, bufs, groups: list[dict]) -> torch.Tensor:
    """One launch: momentum, Nesterov and the (transposing) copy into the stack."""
    if not (_fusable(grads) and _fusable(bufs)) or len({g.dtype for g in grads}) != 1:
        return torch_backend.momentum_stack(bucket, grads, bufs, groups)
    stack = torch.empty((bucket.matrices, bucket.m, bucket.n), dtype=bucket.dtype, device=bucket.device)
    momenta = _cached_floats(bucket, "momenta", [float(groups[e.group]["momentum"]) for e in bucket.entries])
    fused_momentum_op(grads, bufs, momenta, *_layout(bucket), stack, bucket.momentum_form == "ema", bucket.nesterov)
    return stack


def _cached_floats(bucket: Bucket, name: str, values: list[float]) -> torch.Tensor:
    """An fp32 device copy of per-entry scalars, made again only when a value changes, so a
    steady-state step copies nothing from the host (and can be captured in a CUDA graph)."""
    key, table = bucket.cache.get(name, (None, None))
    if key != values:
        table = torch.tensor(values, dtype=torch.float32).to(bucket.device)
        bucket.cache[name] = (values, table)
    return table


def _update_scalars(bucket: Bucket, groups: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry: alpha = -lr·scale and decay = 1 - lr·wd as fp32 device tensors. A float lr is
    folded on the host and cached; a tensor lr (a scheduler's, a CUDA graph's) is combined on the
    device every step, never read back."""
    lrs = [groups[e.group]["lr"] for e in bucket.entries]
    wds = [float(groups[e.group]["weight_decay"]) for e in bucket.entries]
    if not any(isinstance(lr, torch.Tensor) for lr in lrs):
        alphas = _cached_floats(bucket, "alphas", [-lr * e.scale for lr, e in zip(lrs, bucket.entries)])
        return alphas, _cached_floats(bucket, "decays", [1.0 - lr * wd for lr, wd in zip(lrs, wds)])
    lr = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(bucket.device).reshape(()) for v in lrs])
    scales = _cached_floats(bucket, "scales", [e.scale for e in bucket.entries])
    return -lr * scales, 1.0 - lr * _cached_floats(bucket, "weight_decays", wds)


def apply_update(bucket: Bucket, ortho: torch.Tensor, groups: list[dict]) -> None:
    """One launch: W = W·(1 - lr·wd) - lr·scale·O for every parameter of the bucket."""
    params = [e.param for e in bucket.entries]
    if not _fusable(params):
        return torch_backend.apply_update(bucket, ortho, groups)
    fused_apply_update_op(params, *_update_scalars(bucket, groups), *_layout(bucket), ortho)
