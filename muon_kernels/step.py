"""The functional Muon step: momentum → stacked orthogonalization per bucket → decay and update.

Everything here is multi-tensor (torch ``_foreach_*`` ops, one ``cat`` per bucket) so the number
of launches grows with the number of buckets, not the number of parameters.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .plan import Bucket

MOMENTUM_FORMS = ("ema", "sgd")


def momentum_update(
    bufs: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    momentum: float,
    nesterov: bool,
    form: str,
) -> list[torch.Tensor]:
    """Update the momentum buffers in place and return the update U fed to Newton–Schulz.

    ema: M = μM + (1-μ)G;  U = (1-μ)G + μM (nesterov) or M.
    sgd: M = μM + G;       U = G + μM (nesterov) or M.
    The ema form uses lerp exactly as torch.optim.Muon does, so fp32 results agree bit for bit.
    """
    grads = [g if g.dtype == b.dtype else g.to(b.dtype) for g, b in zip(grads, bufs)]
    if form == "ema":
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
        return torch._foreach_lerp(grads, bufs, momentum) if nesterov else list(bufs)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    return torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else list(bufs)


def stack_bucket(bucket: Bucket, updates: dict[int, torch.Tensor]) -> torch.Tensor:
    """(K, m, n) copy of the bucket's updates, tall matrices transposed; never aliases a buffer."""
    views = []
    for e in bucket.entries:
        u = updates[id(e.param)].reshape(e.view.batch, e.view.rows, e.view.cols)
        views.append(u.mT if e.view.transposed else u)
    return torch.cat(views, dim=0)


def orthogonalize_bucket(bucket: Bucket, stack: torch.Tensor, max_workspace_bytes: int | None) -> torch.Tensor:
    """One backend call per bucket, or one per chunk when the workspace cap splits it."""
    chunks = bucket.chunks(max_workspace_bytes)
    if len(chunks) == 1:
        return bucket.backend.orthogonalize(stack, bucket.config, bucket.ns_dtype)
    out = torch.empty(stack.shape, dtype=bucket.ns_dtype, device=stack.device)
    for start, stop in chunks:
        out[start:stop] = bucket.backend.orthogonalize(stack[start:stop], bucket.config, bucket.ns_dtype)
    return out


def apply_bucket_update(bucket: Bucket, ortho: torch.Tensor, groups: list[dict]) -> None:
    """W *= 1 - lr·wd; W -= lr·scale·O — for every parameter of the bucket, foreach per (group, scale)."""
    ortho = ortho.to(bucket.entries[0].param.dtype)
    batches: dict[tuple[int, float], tuple[list, list]] = defaultdict(lambda: ([], []))
    offset = 0
    for e in bucket.entries:
        o = ortho[offset : offset + e.view.batch]
        offset += e.view.batch
        params, outs = batches[(e.group, e.scale)]
        params.append(e.param)
        outs.append((o.mT if e.view.transposed else o).reshape(e.param.shape))
    for (gi, scale), (params, outs) in batches.items():
        group = groups[gi]
        lr = float(group["lr"])
        decay = 1.0 - lr * group["weight_decay"]
        if decay != 1.0:
            # A 0-dim fp32 tensor, not a Python float: on CPU, torch 2.13's _foreach_mul_ rounds a
            # Python scalar to the tensors' dtype first (0.998 becomes 0.996 in bf16, doubling the decay).
            torch._foreach_mul_(params, torch.tensor(decay, dtype=torch.float32, device=bucket.device))
        torch._foreach_add_(params, outs, alpha=-lr * scale)
