"""What the fused backends (``triton``, ``cuda``) share: which tensors their multi-tensor kernels
can address, and the per-entry scalar tables those kernels read on the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..plan import Bucket

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fusable(tensors) -> bool:
    """The fused kernels address tensors as flat contiguous memory, or as rows of a wider matrix (a
    split piece that is a column block: stride (ld, 1)), and compute in fp32; other layouts
    (channels_last, transposed views) and fp64 tensors take the torch path."""
    return all(t.dtype in FUSED_DTYPES and (t.is_contiguous() or (t.ndim == 2 and t.stride(1) == 1))
               for t in tensors)


def same_layout(bucket: Bucket, tensors) -> bool:
    """Gradients and buffers are addressed with the parameters' row strides: they must share them."""
    return all(t.stride() == e.target.stride() or (t.is_contiguous() and e.target.is_contiguous())
               for t, e in zip(tensors, bucket.entries))


def row_stride(e) -> int:
    """Elements between two rows of the entry's memory: its columns, or the wider parameter's for a
    split piece that is a column block."""
    t = e.target
    return e.view.cols if t.is_contiguous() else t.stride(0)


def cached_floats(bucket: Bucket, name: str, values: list[float]) -> torch.Tensor:
    """An fp32 device copy of per-entry scalars, made again only when a value changes, so a
    steady-state step copies nothing from the host (and can be captured in a CUDA graph)."""
    key, table = bucket.cache.get(name, (None, None))
    if key != values:
        table = torch.tensor(values, dtype=torch.float32).to(bucket.device)
        bucket.cache[name] = (values, table)
    return table


def momenta(bucket: Bucket, groups: list[dict]) -> torch.Tensor:
    """(μ, 1 - μ) per entry, fp32 on the bucket's device. 1 - μ is formed in double and then rounded,
    as torch's ``lerp_(bufs, grads, 1 - μ)`` does; ``1 - fp32(μ)`` on the device is 3 ulps off at μ = 0.95."""
    mus = [float(groups[e.group]["momentum"]) for e in bucket.entries]
    return cached_floats(bucket, "momenta", [v for mu in mus for v in (mu, 1.0 - mu)])


def update_scalars(bucket: Bucket, groups: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry: alpha = -lr·scale and decay = 1 - lr·wd as fp32 device tensors. A float lr is
    folded on the host and cached; a tensor lr (a scheduler's, a CUDA graph's) is combined on the
    device every step, never read back."""
    lrs = [groups[e.group]["lr"] for e in bucket.entries]
    wds = [float(groups[e.group]["weight_decay"]) for e in bucket.entries]
    if not any(isinstance(lr, torch.Tensor) for lr in lrs):
        alphas = cached_floats(bucket, "alphas", [-lr * e.scale for lr, e in zip(lrs, bucket.entries)])
        return alphas, cached_floats(bucket, "decays", [1.0 - lr * wd for lr, wd in zip(lrs, wds)])
    lr = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(bucket.device).reshape(()) for v in lrs])
    scales = cached_floats(bucket, "scales", [e.scale for e in bucket.entries])
    return -lr * scales, 1.0 - lr * cached_floats(bucket, "weight_decays", wds)
