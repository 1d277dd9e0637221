"""The Newton–Schulz recurrences, written once over a backend's three matrix products.

Every backend supplies ``MatmulOps`` — ``gram(X) = X·Xᵀ``, ``poly(A, b, c) = b·A + c·A·A`` (A
symmetric) and ``apply(B, X, a) = a·X + B·X`` — with its own kernels (torch: bmm/baddbmm; Triton:
the symmetric kernels and the fused a·X + B·X; CUDA: the extension's kernels on zero-padded
buffers). This module turns them into:

- ``standard``: per step ``A = X·Xᵀ; B = b·A + c·A·A; X = a·X + B·X`` (4m²n + 2m³ FLOPs).
- ``gram`` (Gram Newton–Schulz, Zhang, Amsel, Chen, Dao 2026): every step is X ← p(R)·X with
  R = X·Xᵀ and p(t) = a + b·t + c·t², and all p(R) are polynomials in the same R, so the m×n matrix
  is touched only to form R and at the end: Z = b·R + c·R², Q ← Q·Z + a·Q (the accumulated p's),
  R ← p(R)·R·p(R) = Z·(R·Z + a·R) + a·(R·Z + a·R), and X = Q·X once. In 16 bits R drifts from
  the X it describes, so at each step listed in ``restarts`` X ← Q·X and R ← X·Xᵀ are recomputed
  from the matrix (docs/newton_schulz.md has the FLOP counts and the measurements behind the
  default restarts).
- ``aol`` preconditioning (Turbo-Muon): after the Frobenius scaling, X ← diag(s)·X with
  s_i = (Σ_j |X·Xᵀ|_ij)^-1/2, which bounds ‖X‖₂ ≤ 1 (AOL, Prach & Lampert 2022) and pulls small
  singular values up; the Gram matrix it needs is the first step's A (or R), rescaled as
  diag(s)·A·diag(s), so it costs one m×n scaling pass.

``choose_algorithm`` resolves ``"auto"`` per bucket shape and dtype from measured thresholds.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

import torch

from . import workspace
from .ns_config import POLAR_EXPRESS, NSConfig


class MatmulOps(NamedTuple):
    gram: Callable[[torch.Tensor], torch.Tensor]  # X (k, m, n) -> X·Xᵀ (k, m, m)
    poly: Callable[[torch.Tensor, float, float], torch.Tensor]  # A, b, c -> b·A + c·A·A
    apply: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # B, X, a -> a·X + B·X
    # A backend's own Gram NS with ``gram``'s schedule (X, coefficients, restarts, R or None) -> X,
    # where it can fuse what the three products cannot (the Triton kernels); None: ``gram`` below.
    gram_driver: Callable[..., torch.Tensor] | None = None
    # Where the products write: ``Outputs`` (one call's buffers, rewritten step after step), or None
    # (a fresh tensor per product).
    outputs: "Outputs | None" = None


class Outputs:
    """One call's product outputs for the standard schedule, allocated on first use and rewritten by
    every later step: a step's A = X·Xᵀ and B = p(A) are dead once the next product has read them,
    and a·X + B·X ping-pongs between two m×n buffers, never the X it reads. ``spare`` is the
    normalized X the call was given (its own copy): dead once the first step has read it, so it is
    the second of the two m×n buffers (``second``, where given, the first: memory the caller gives up,
    such as a consumed stack's). A call then holds one A, one B and two X's (2mn + 2m² per
    matrix) where fresh outputs held three X's — the normalized input stays referenced by the
    callers' frames until the recurrence returns — and at batch 1 four allocations instead of one
    per product are less host time on a launch-bound call. ``recurrence.gram`` keeps more products
    alive at once, so it refuses ops that carry outputs (Gram NS drivers manage their own buffers).
    A buffer handed out again is NaN-filled again under ``MUON_KERNELS_DEBUG_FILL=nan``."""

    def __init__(self, spare: torch.Tensor, second: torch.Tensor | None = None):
        self.applied = 0
        self.second = second  # the other m×n buffer where the caller has one (a consumed stack's memory)
        self.buffers: dict[str, torch.Tensor] = {"X1": spare} if second is None else {"X1": spare, "X0": second}

    def _get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[name] = workspace.empty(shape, dtype=like.dtype, device=like.device)
            return buf
        return workspace.poisoned(buf)

    def gram(self, X: torch.Tensor) -> torch.Tensor:
        """The buffer for X·Xᵀ."""
        return self._get("A", X.shape[:-1] + X.shape[-2:-1], X)

    def poly(self, A: torch.Tensor) -> torch.Tensor:
        """The buffer for b·A + c·A·A."""
        return self._get("B", A.shape, A)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """The buffer for a·X + B·X: the m×n buffer that is not X — X0 for the first step (whose X
        is the spare), then each step the one the step before did not write. Counted, not compared
        by address: a traced step's fake tensors have none."""
        self.applied += 1
        return self._get("X0" if self.applied % 2 else "X1", X.shape, X)


def batched_gemm_ops(outputs: Outputs | None = None) -> MatmulOps:
    """cuBLAS's (or the CPU BLAS's) batched GEMMs, one per product: X·Xᵀ; b·A + c·A·A; a·X + B·X
    (beta=0 ignores X, NaN included); into ``outputs``' buffers, or fresh tensors."""
    if outputs is None:
        return BATCHED_GEMM_OPS
    return MatmulOps(
        gram=lambda X: torch.bmm(X, X.mT, out=outputs.gram(X)),
        poly=lambda A, b, c: torch.baddbmm(A, A, A, beta=b, alpha=c, out=outputs.poly(A)),
        apply=lambda B, X, a: torch.baddbmm(X, B, X, beta=a, out=outputs.apply(X)),
        outputs=outputs,
    )


# The torch backend's products, and the Triton backend's "cublas" path, with fresh outputs.
BATCHED_GEMM_OPS = MatmulOps(
    gram=lambda X: torch.bmm(X, X.mT),
    poly=lambda A, b, c: torch.baddbmm(A, A, A, beta=b, alpha=c),
    apply=lambda B, X, a: torch.baddbmm(X, B, X, beta=a),
)


def aol(X: torch.Tensor, A: torch.Tensor, floor: float, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """AOL rescaling of X (k, m, n) given A = X·Xᵀ: (diag(s)·X, diag(s)·A·diag(s)) with
    s = max(Σ_j |A_ij|, floor)^-1/2, computed in fp32 and rounded once to X's dtype. X is already
    Frobenius-normalized (AOL is scale-invariant, so that changes nothing but keeps 16-bit A finite),
    which makes the floor relative to ‖U‖²: a row whose squared norm is below it is not blown up.
    Zero rows (a zero matrix, or the cuda backend's zero padding) stay zero. ``in_place``: X is
    the caller's to overwrite, and diag(s)·X goes into it (the same bits: an in-place multiply of a
    16-bit X by fp32 s computes in fp32 and rounds once, without an fp32 copy of X)."""
    acc = torch.promote_types(X.dtype, torch.float32)
    s = A.to(acc).abs().sum(dim=-1).clamp_min(floor).rsqrt()
    X = X.mul_(s.unsqueeze(-1)) if in_place else (X.to(acc) * s.unsqueeze(-1)).to(X.dtype)
    A = (A.to(acc) * s.unsqueeze(-1) * s.unsqueeze(-2)).to(A.dtype)
    return X, A


def standard(X: torch.Tensor, coefficients, ops: MatmulOps, A: torch.Tensor | None = None) -> torch.Tensor:
    """The standard recurrence; ``A`` (= X·Xᵀ) is used for the first step when given (AOL formed it)."""
    for i, (a, b, c) in enumerate(coefficients):
        if A is None or i > 0:
            A = ops.gram(X)
        X = ops.apply(ops.poly(A, b, c), X, a)
    return X


def gram(X: torch.Tensor, coefficients, restarts: tuple[int, ...], ops: MatmulOps,
         R: torch.Tensor | None = None) -> torch.Tensor:
    """Gram Newton–Schulz: the same polynomial map as ``standard`` iterated on R = X·Xᵀ (m×m) and an
    accumulated m×m factor Q, restarted from X before each step in ``restarts``; X = Q·X at the end."""
    steps = len(coefficients)
    if ops.outputs is not None:
        raise ValueError("recurrence.gram: ops that write into Outputs (the standard schedule's ping-pong "
                         "buffers) would overwrite products Gram NS still holds; pass ops with fresh outputs")
    if steps == 0:
        return X
    if R is None:
        R = ops.gram(X)
    Q = None
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts:
            X = ops.apply(Q, X, 0.0)
            R = ops.gram(X)
            Q = None
        Z = ops.poly(R, b, c)
        if Q is None:  # first step after a (re)start: Q = p(R) = Z + a·I, a diagonal add, no product
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = ops.apply(Z, Q, a)  # Z·Q + a·Q = Q·p(R)
        if i + 1 < steps and i + 1 not in restarts:
            RZ = ops.apply(Z, R, a)  # R·Z + a·R (Z and R commute: polynomials in one R)
            R = ops.apply(Z, RZ, a)  # Z·RZ + a·RZ = p(R)·R·p(R)
    return ops.apply(Q, X, 0.0)


def run(X: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype, ops: MatmulOps) -> torch.Tensor:
    """The recurrence ``config`` describes (algorithm resolved: "standard" or "gram") on a normalized X;
    where ``ops.outputs`` is given, X must be its spare (the call's own copy: it is overwritten)."""
    if config.steps == 0 or X.numel() == 0:
        return X
    A = None
    if config.normalization == "aol":  # into X where it is the call's own (ops.outputs' spare)
        X, A = aol(X, ops.gram(X), config.floor, in_place=ops.outputs is not None)
    if config.algorithm == "gram":
        if ops.gram_driver is not None:
            return ops.gram_driver(X, config.coefficients, config.gram_restarts(ns_dtype), A)
        return gram(X, config.coefficients, config.gram_restarts(ns_dtype), ops, A)
    return standard(X, config.coefficients, ops, A)


def run_owned(X: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype,
              make_ops: Callable[[Outputs | None], MatmulOps], second: torch.Tensor | None = None) -> torch.Tensor:
    """``run`` on the call's own normalized X (overwritten), with ``make_ops(outputs)``'s products
    writing into one ``Outputs`` — X (and ``second``) among its buffers — except where
    ``recurrence.gram`` runs (no Gram driver), which holds more products than those buffers: it gets
    fresh outputs."""
    ops = make_ops(Outputs(X, second))
    if config.algorithm == "gram" and ops.gram_driver is None:
        ops = make_ops(None)
    return run(X, config, ns_dtype, ops)


def flops(m: int, n: int, config: NSConfig, ns_dtype: torch.dtype) -> int:
    """Naive FLOPs of one m×n (m <= n) orthogonalization under ``config`` (algorithm resolved); an AOL
    Gram matrix is reused by the first step, so it adds nothing but an m×n scaling."""
    steps = config.steps
    if config.algorithm != "gram":
        return steps * (4 * m * m * n + 2 * m**3)
    restarts = config.gram_restarts(ns_dtype)
    total = 2 * m * m * n + 2 * m * m * n  # R = X·Xᵀ, final Q·X
    for i in range(steps):
        total += 4 * m * m * n if i in restarts else 0  # X = Q·X, R = X·Xᵀ
        total += 2 * m**3  # Z
        total += 0 if i == 0 or i in restarts else 2 * m**3  # Q·Z
        total += 4 * m**3 if i + 1 < steps and i + 1 not in restarts else 0  # R update
    return total


# "auto" picks Gram when n/m reaches this, per device type and iteration dtype. CPU: measured on a
# 2-core EPYC (bench/results/cpu/ns_algorithms.json, torch backend, default restarts): fp32 Gram is
# 0.95× at n/m = 1.5, 1.22× at 2, 1.57× at 3, 1.8–2.0× at 4; bf16 (two restarts) 1.01× at 1.5, 1.06×
# at 2, 1.17× at 3, 1.28–1.30× at 4; fp16 never (CPU fp16 GEMMs are ~80× slower than bf16). GPUs,
# no Gram threshold measured yet (the 2026-12-04 H200 run timed single points only): where
# ``flops`` makes Gram 20% cheaper than standard NS (fp32 unrestarted: n/m >= 2; 16-bit with two
# restarts: n/m >= 3), leaving room for Gram's extra launches.
AUTO_GRAM_ASPECT: dict[tuple[str, torch.dtype], float] = {
    ("cpu", torch.float32): 2.0,
    ("cpu", torch.bfloat16): 2.0,
    ("cpu", torch.float16): float("inf"),
    ("cuda", torch.float32): 2.0,
    ("cuda", torch.bfloat16): 3.0,
    ("cuda", torch.float16): 3.0,
}


# Coefficient sets whose Gram iteration in bf16 was measured outside DESIGN.md §5's accuracy band
# (docs/newton_schulz.md, "Gram accuracy by preset"; bench/ns_accuracy.py's preset table): with
# polar_express's large first step (b ≈ -22, c ≈ 16) bf16 Gram NS reached 1.35× the band on 64×128
# Gaussian inputs whatever the restarts, where keller, quintic and turbo stay under 0.54× and every
# preset in fp16 under 0.48×. "auto" keeps standard NS for them in bf16.
GRAM_BF16_OUTSIDE_BAND: tuple[tuple[tuple[float, float, float], ...], ...] = (POLAR_EXPRESS,)


def gram_outside_band(config: NSConfig, ns_dtype: torch.dtype) -> bool:
    """Whether Gram NS in ``ns_dtype`` was measured outside the band for ``config``'s coefficients."""
    if ns_dtype != torch.bfloat16:
        return False
    k = min(config.steps, 5)
    return any(config.coefficients[:k] == steps[:k] for steps in GRAM_BF16_OUTSIDE_BAND)


def choose_algorithm(config: NSConfig, m: int, n: int, ns_dtype: torch.dtype,
                     device: torch.device) -> tuple[NSConfig, str]:
    """Resolve ``config.algorithm`` for an m×n (m <= n) bucket; returns the config and why."""
    if config.algorithm != "auto":
        why = "Gram NS (ns_algorithm='gram')" if config.algorithm == "gram" else "standard NS"
        return config, why
    if gram_outside_band(config, ns_dtype):
        return replace(config, algorithm="standard"), ("auto: standard NS (Gram NS in bf16 with these coefficients "
                                                       "measured outside the accuracy band)")
    threshold = AUTO_GRAM_ASPECT.get((device.type, ns_dtype), AUTO_GRAM_ASPECT[("cuda", ns_dtype)])
    if n >= threshold * m:
        return replace(config, algorithm="gram"), f"auto: Gram NS (n/m = {n / m:.2f} >= {threshold:g})"
    return replace(config, algorithm="standard"), f"auto: standard NS (n/m = {n / m:.2f} < {threshold:g})"
