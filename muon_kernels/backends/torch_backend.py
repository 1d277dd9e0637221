"""Pure-PyTorch reference backend: batched Newton–Schulz with ``bmm``/``baddbmm``.

It is the ground truth that every kernel is tested against and the path CPU users run, so it
does the plainest thing: normalize in fp32, cast once to the iteration dtype, and run the
recurrence on the whole stack with one batched GEMM per term.
"""

from __future__ import annotations

import torch

from ..orthogonalize import NSConfig

NAME = "torch"


def status(device: torch.device | None = None) -> tuple[bool, str]:
    return True, "pure PyTorch (batched bmm/baddbmm); runs on every device"


def kernel_path(m: int, n: int, ns_dtype: torch.dtype) -> tuple[str, str]:
    return "baddbmm", "reference recurrence: one batched GEMM per term, any shape"


def normalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype) -> torch.Tensor:
    """``stack / max(norm_scale·‖stack‖_F + norm_offset, floor)`` per matrix, in fp32, cast to ns_dtype.

    Always returns a new tensor: the caller's buffer (a momentum buffer, say) is never scaled in place.
    """
    norms = torch.linalg.vector_norm(stack, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    denom = (norms * config.norm_scale + config.norm_offset).clamp_min(config.floor)
    return (stack.to(torch.float32) / denom).to(ns_dtype)


def orthogonalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype) -> torch.Tensor:
    """Newton–Schulz on a (k, m, n) stack with m <= n; returns (k, m, n) in ``ns_dtype``."""
    X = normalize(stack, config, ns_dtype)
    for a, b, c in config.coefficients:
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X
