"""Per-entry scalars of a bucket's step as device tensors: (μ, 1 - μ), -lr·scale and 1 - lr·wd,
which the fused momentum and update kernels read and the variants' per-matrix factors combine."""

from __future__ import annotations

import torch

from .bucket import Bucket


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
    # A float lr of another group in the same bucket becomes a device scalar by a fill kernel, not a
    # host-to-device copy (which a CUDA-graph capture could not contain).
    lr = torch.stack([v.to(device=bucket.device, dtype=torch.float32).reshape(()) if isinstance(v, torch.Tensor)
                      else torch.full((), v, dtype=torch.float32, device=bucket.device) for v in lrs])
    scales = cached_floats(bucket, "scales", [e.scale for e in bucket.entries])
    return -lr * scales, 1.0 - lr * cached_floats(bucket, "weight_decays", wds)
