"""Symmetric product ``C = alpha·X·Xᵀ + beta·D`` over a batch, computing only upper-triangle tiles.

Both Gram products of a Newton–Schulz step have this form: ``A = X·Xᵀ`` (alpha=1, no D) and
``B = b·A + c·A·A`` (X = A, which is symmetric so A·A = A·Aᵀ; alpha=c, D=A, beta=b). The result is
symmetric, so the grid enumerates only tile pairs (i <= j) — no program is launched just to exit —
and each off-diagonal tile is stored twice, once mirrored. ``XᵀX`` of a tall matrix is the same
call on its transposed view: the kernel reads through strides, so no transposed copy is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import workspace
from . import autotune
from .config import FP_FUSION, MatmulConfig, checked_grid, precision_for, upcast_for


@triton.jit
def _triangle_coords(pid):
    """Program id → (i, j) with i <= j, enumerating column by column: pid = j(j+1)/2 + i."""
    j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # fp32 sqrt can land one off near perfect squares; nudge j so that j(j+1)/2 <= pid < (j+1)(j+2)/2.
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    return pid - j * (j + 1) // 2, j


@triton.jit
def _symmetric_matmul_kernel(
    X, D, C,
    M, K,
    stride_xb, stride_xm, stride_xk,
    stride_db, stride_dm, stride_dn,
    stride_cb, stride_cm, stride_cn,
    alpha, beta,
    HAS_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The batch is folded into grid axis 0 (axis 1 stops at 65,535 on a GPU; the interpreter never says so).
    # Program ids fit int32, so the division stays 32-bit (a 64-bit one is a called routine with a
    # stack frame); the batch offset is int64: batch × stride overflows int32 for big stacks.
    pid = tl.program_id(0)
    tiles = tl.cdiv(M, BLOCK)
    per_matrix = tiles * (tiles + 1) // 2
    batch = pid // per_matrix
    ti, tj = _triangle_coords(pid - batch * per_matrix)
    batch = batch.to(tl.int64)
    X += batch * stride_xb
    C += batch * stride_cb
    # int64 row and column indices: row × stride passes 2^31 inside one large matrix (65536×32768).
    rows_i = (ti * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rows_j = (tj * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)  # a transposed view's k stride is a row stride
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        a = tl.load(X + rows_i[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rows_i[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(X + rows_j[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rows_j[:, None] < M) & (kk[None, :] < K), other=0.0)
        if UPCAST:  # the CPU interpreter multiplies raw bf16 bit patterns; give it fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    alpha = tl.cast(alpha, tl.float32)  # scalars may arrive as fp64 (torch.compile); compute in fp32
    out = acc * alpha
    mask = (rows_i[:, None] < M) & (rows_j[None, :] < M)
    if HAS_D:
        D += batch * stride_db
        d = tl.load(D + rows_i[:, None] * stride_dm + rows_j[None, :] * stride_dn, mask=mask, other=0.0)
        out += tl.cast(beta, tl.float32) * d.to(tl.float32)
    out = out.to(C.dtype.element_ty)
    tl.store(C + rows_i[:, None] * stride_cm + rows_j[None, :] * stride_cn, out, mask=mask)
    if ti != tj:
        # The mirrored tile C[j, i] = C[i, j]ᵀ: same values, row and column strides swapped.
        tl.store(C + rows_i[:, None] * stride_cn + rows_j[None, :] * stride_cm, out, mask=mask)


def symmetric_matmul(
    X: torch.Tensor,
    *,
    alpha: float = 1.0,
    D: torch.Tensor | None = None,
    beta: float = 0.0,
    out: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """``alpha·X·Xᵀ + beta·D`` for a (batch, m, k) stack ``X`` (any strides); returns (batch, m, m).

    ``D`` must be symmetric (only its upper-triangle tiles are read). ``fp32_precision`` picks
    ``"ieee"`` or ``"tf32"`` for fp32 operands; it is ignored for bf16/fp16.
    """
    if X.ndim != 3:
        raise ValueError(f"symmetric_matmul: X must be (batch, m, k), got shape {tuple(X.shape)}")
    batch, m, k = X.shape
    if out is None:
        out = workspace.empty((batch, m, m), dtype=X.dtype, device=X.device)
    if D is not None and D.shape != (batch, m, m):
        raise ValueError(f"symmetric_matmul: D must be {(batch, m, m)}, got {tuple(D.shape)}")
    if batch == 0 or m == 0:
        return out
    cfg = config or autotune.choose(
        "symmetric", X.device, X.dtype, m, m, k,
        lambda c: symmetric_matmul(X, alpha=alpha, D=D, beta=beta, config=c, fp32_precision=fp32_precision))
    tiles = triton.cdiv(m, cfg.block_m)
    dummy = D if D is not None else out  # never read when HAS_D is False
    _symmetric_matmul_kernel[(checked_grid(tiles * (tiles + 1) // 2 * batch, "symmetric_matmul"),)](
        X, dummy, out,
        m, k,
        *X.stride(), *dummy.stride(), *out.stride(),
        float(alpha), float(beta),
        HAS_D=D is not None,
        BLOCK=cfg.block_m,
        BLOCK_K=cfg.block_k,
        UPCAST=upcast_for(X),
        PRECISION=precision_for(X.dtype, fp32_precision),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=FP_FUSION,
    )
    return out
