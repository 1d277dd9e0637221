"""Triton backend: the fused, batched symmetric Newton–Schulz kernels of ``muon_kernels.triton_kernels``.

Importing this module imports triton; the registry only does so when the backend is asked about.
"""

from __future__ import annotations

import torch

from ..orthogonalize import NSConfig
from ..triton_kernels.newton_schulz import newton_schulz

NAME = "triton"


def kernel_path(m: int, n: int, ns_dtype: torch.dtype) -> tuple[str, str]:
    return "symmetric", (
        "triangular-grid X·Xᵀ and b·A+c·A·A (upper tiles, mirrored store), a·X+B·X epilogue; "
        "2 + 3·steps launches per bucket"
    )


def orthogonalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype) -> torch.Tensor:
    return newton_schulz(stack, config, ns_dtype)
