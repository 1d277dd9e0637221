"""DESIGN.md §5's 16-bit band for presets with their own normalization.

The band is 2 × (error of a plain 16-bit torch matmul recurrence) + 1e-2 against the fp64
recurrence. ``oracles.plain_recurrence`` always scales by the Frobenius norm only; for a preset
that iterates from AOL ("turbo") its error then measures AOL-vs-Frobenius (4.0e-2 in fp16 on a
4×256×1024 Gaussian input), not rounding, and the band built on it is 6× too loose. This baseline
applies the normalization the preset iterates from, in the same 16-bit dtype.
"""

from __future__ import annotations

import torch

from muon_kernels.ns_config import resolve_ns_config
from oracles import reference_ns, rel_err


def plain_with_own_normalization(G: torch.Tensor, dtype: torch.dtype, preset) -> torch.Tensor:
    config = resolve_ns_config(preset, None, 1e-7)
    out = []
    for M in G.reshape(-1, *G.shape[-2:]):
        tall = M.shape[0] > M.shape[1]
        X = (M.T if tall else M).to(dtype)
        X = X / (X.norm() * config.norm_scale + config.norm_offset).clamp(min=1e-7)
        if config.normalization == "aol":
            X = X / (X @ X.T).abs().sum(dim=1).clamp_min(1e-7).sqrt()[:, None]
        for a, b, c in config.coefficients:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        out.append(X.T if tall else X)
    return torch.stack(out).reshape(G.shape).to(torch.float64)


def band(G: torch.Tensor, dtype: torch.dtype, preset) -> tuple[torch.Tensor, float]:
    """(fp64 reference, bound) for orthogonalizing G in ``dtype`` with ``preset``."""
    ref = reference_ns(G, preset)
    return ref, 2 * rel_err(plain_with_own_normalization(G, dtype, preset), ref) + 1e-2
