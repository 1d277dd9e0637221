"""Independent oracles: the fp64 Newton–Schulz recurrence, a plain low-precision baseline, controlled spectra."""

from __future__ import annotations

import torch

from muon_kernels.ns_config import resolve_ns_config


def reference_ns(G: torch.Tensor, ns_coefficients="keller", ns_steps: int | None = None, eps: float = 1e-7,
                 ns_normalization: str | None = None) -> torch.Tensor:
    """The DESIGN.md §1 recurrence in fp64, one matrix at a time, written independently of the package.
    With AOL (Turbo-Muon, arXiv 2512.04632 / thib-s/flash-newton-schulz): after the Frobenius scaling
    each row i of X is divided by sqrt(Σ_j |(X·Xᵀ)_ij|) (at least the floor)."""
    config = resolve_ns_config(ns_coefficients, ns_steps, eps, "standard", ns_normalization)
    floor = max(eps, torch.finfo(torch.float32).tiny)
    out = []
    for M in G.reshape(-1, *G.shape[-2:]).to(torch.float64):
        tall = M.shape[0] > M.shape[1]
        X = M.T if tall else M
        X = X / max(X.norm().item() * config.norm_scale + config.norm_offset, floor)
        if config.normalization == "aol" and config.steps:
            X = X / (X @ X.T).abs().sum(dim=1).clamp_min(floor).sqrt()[:, None]
        for a, b, c in config.coefficients:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        out.append(X.T if tall else X)
    return torch.stack(out).reshape(G.shape)


def reference_gram_ns(X: torch.Tensor, coefficients, restarts, dtype: torch.dtype) -> torch.Tensor:
    """Gram Newton–Schulz as the Dao-AILab README states it (R = X·Xᵀ, Q = I; per step Z = b·R + c·R²,
    Q = Q·Z + a·Q, RZ = R·Z + a·R, R = Z·RZ + a·RZ; before a restart step X = Q·X, R = X·Xᵀ, Q = I;
    X = Q·X at the end), on one already-normalized wide matrix, every product in ``dtype``."""
    X = X.to(dtype)
    eye = torch.eye(X.shape[0], dtype=dtype)
    R, Q = X @ X.T, eye
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts:
            X = Q @ X
            R, Q = X @ X.T, eye
        Z = b * R + c * R @ R
        Q = Q @ Z + a * Q
        RZ = R @ Z + a * R
        R = Z @ RZ + a * RZ
    return Q @ X


def plain_recurrence(G: torch.Tensor, dtype: torch.dtype, ns_coefficients="keller", ns_steps: int = 5,
                     own_normalization: bool = False) -> torch.Tensor:
    """A plain low-precision torch matmul recurrence (normalize, cast, iterate): the error baseline of
    DESIGN.md §5. It scales by the Frobenius norm only; ``own_normalization`` applies the preset's own
    normalization (AOL for "turbo"), the baseline for presets that iterate from it (``band``)."""
    config = resolve_ns_config(ns_coefficients, ns_steps, 1e-7)
    out = []
    for M in G.reshape(-1, *G.shape[-2:]):
        tall = M.shape[0] > M.shape[1]
        X = (M.T if tall else M).to(dtype)
        X = X / (X.norm() * config.norm_scale + config.norm_offset).clamp(min=1e-7)
        if own_normalization and config.normalization == "aol":
            X = X / (X @ X.T).abs().sum(dim=1).clamp_min(1e-7).sqrt()[:, None]
        for a, b, c in config.coefficients:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        out.append(X.T if tall else X)
    return torch.stack(out).reshape(G.shape).to(torch.float64)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def negative_largest_entry(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """An fp32 (k >= 2, m >= 4, n >= 2) stack of entries near 1e-30 whose largest magnitude is a
    negative entry (-1e30), and whose second matrix has no positive entry: a normalization scaled by
    the largest positive entry instead of the largest |x| would overflow to -inf."""
    G = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-30).float()
    G[0, 3, 1] = -1e30
    G[1] = -G[1].abs()
    return G


def controlled_spectrum(m: int, n: int, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with random orthonormal U (m×k), V (n×k), k = min(m, n), in fp64."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator))
    return U @ torch.diag(sigma.to(torch.float64)) @ V.T


def scalar_map(preset, ns_steps: int | None = None):
    """(diag(σ) input in fp32, the scalar recurrence σ ← aσ + bσ³ + cσ⁵ on it in fp64).

    On a diagonal input Newton–Schulz reduces to that scalar map (DESIGN.md §5): coefficients shifted
    by one step, or one step too many, move the result by 0.02–0.07. AOL divides row i of diag(σ)
    by sqrt(σ_i²) = σ_i, so every σ starts at 1.
    """
    sigma = torch.tensor([1.0, 0.7, 0.5, 0.3, 0.1, 0.03, 0.01], dtype=torch.float64)
    config = resolve_ns_config(preset, ns_steps, 1e-7)
    s = sigma / (sigma.norm() * config.norm_scale + config.norm_offset)
    if config.normalization == "aol":
        s = s / s
    for a, b, c in config.coefficients:
        s = a * s + b * s**3 + c * s**5
    return torch.diag(sigma).float(), s


def band(G: torch.Tensor, dtype: torch.dtype, preset) -> tuple[torch.Tensor, float]:
    """(fp64 reference, DESIGN.md §5 bound) for orthogonalizing G in a 16-bit ``dtype`` with
    ``preset``: 2 × the plain recurrence's error + 1e-2, the plain recurrence iterating from the
    preset's own normalization. (With the Frobenius scaling alone, a "turbo" baseline would measure
    AOL-vs-Frobenius — 4.0e-2 in fp16 on a 4×256×1024 Gaussian input — not rounding, and the band
    built on it would be 6× too loose.)"""
    ref = reference_ns(G, preset)
    return ref, 2 * rel_err(plain_recurrence(G, dtype, preset, None, own_normalization=True), ref) + 1e-2
