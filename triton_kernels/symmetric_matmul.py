"""Symmetric product ``C = alpha·X·Yᵀ + beta·D + shift·I`` over a batch, computing only upper-triangle tiles.

Both Gram products of a Newton–Schulz step have this form: ``A = X·Xᵀ`` (Y = X, alpha=1, no D) and
``B = b·A + c·A·A`` (X = Y = A, which is symmetric so A·A = A·Aᵀ; alpha=c, D=A, beta=b). Gram
Newton–Schulz adds products of two different symmetric matrices that commute (polynomials in the
same R: R·P, P·(R·P), Q·P), whose product is symmetric too, and ``P = b·R + c·R·R + a·I`` (the
shift). The result is symmetric, so the grid enumerates only tile pairs (i <= j) — no program is
launched just to exit — and each tile's upper triangle is stored twice, once mirrored (so C is
exactly symmetric). ``XᵀX`` of a
tall matrix is the same call on its transposed view: the kernel reads through strides, so no
transposed copy is made.

Products with few output tiles (fewer than two waves of the device's SMs) are split along K
(config.split_factor): each program accumulates one K slice of one tile into an fp32 partial and
counts itself in at the tile's arrival counter; the tile's last program to arrive sums the tile's
partials in slice order and applies the epilogue, in the same launch. The sum's order is fixed
(slice 0, 1, …, whoever arrives last), so repeated calls give the same bits; the counter is an
integer atomic, the only atomic, and never touches the floats. One launch per product instead of
two: at batch 1 a skinny product is host-bound, and the second launch cost more host time than
its kernel ran (bench/README.md, "Host time of a launch").
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import workspace
from ..workspace import COUNTERS
from . import autotune
from .config import (FP_FUSION, MatmulConfig, arch_of, cdiv, checked_grid, persistent_programs, precision_for,
                     sm_count, split_factor, upcast_for)
from .descriptors import descriptor, load_tile
from .launch import launch


def fixup_rows(block: int, itemsize: int, arch: int) -> int:
    """Rows of a tile the last-arriving program sums at a time: 16 of a 128-wide tile (8 fp32
    registers a thread at 8 warps), 8 of a 64-wide 16-bit one, 16 of a 64-wide fp32 one (all of it
    on sm_100). Chosen by compiling every split kernel the AOT test checks (plain and persistent,
    narrowest and widest epilogue, sm_80…sm_120, Triton 3.6 to 3.9) with 4…64 rows: ptxas's choices
    are not monotonic, nor the same from one Triton to the next (a 64-wide fp32 tile on sm_90 has an
    8–24-byte stack frame at 64 rows under 3.7/3.8, at 32 under 3.6/3.9, at 4 under 3.9; on sm_100
    at 8–32 rows under 3.6/3.7; on sm_120 at all but 16), and these are the values with none
    anywhere. ``arch``: the device's compute capability (0 under the interpreter)."""
    if block >= 128:
        rows = 16
    elif itemsize < 4:
        rows = 8
    else:
        rows = 64 if arch == 100 else 16
    return min(rows, block)


# _triangle_coords computes 8·pid + 1 in int32: at most 2^28 tiles per matrix (m ≈ 1.5 M at 64-wide tiles).
_TRIANGLE_TILES_MAX = 2**28


@triton.jit
def _triangle_coords(pid):
    """Program id → (i, j) with i <= j, enumerating column by column: pid = j(j+1)/2 + i."""
    j = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # fp32 sqrt can land one off near perfect squares; nudge j so that j(j+1)/2 <= pid < (j+1)(j+2)/2.
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    return pid - j * (j + 1) // 2, j


@triton.jit
def _tile_of(tile, per_matrix):
    """Tile index over the whole batch → (batch, i, j)."""
    batch = tile // per_matrix
    ti, tj = _triangle_coords(tile - batch * per_matrix)
    return batch, ti, tj


@triton.jit
def _symmetric_epilogue(acc, D, C, batch, rows, cols, M,
                        stride_db, stride_dm, stride_dn, stride_cb, stride_cm, stride_cn,
                        alpha, beta, shift, HAS_D: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """C[r, c] = alpha·acc + beta·D[r, c] (+ shift where r = c) for r <= c, and C[c, r] the same
    value for r < c. Tiles lie on or above the diagonal, so off-diagonal tiles store everything
    twice (once mirrored) and diagonal tiles their upper triangle twice: C is exactly symmetric
    even where X·Yᵀ's diagonal tile is not (X ≠ Y: R·P is symmetric only up to rounding)."""
    alpha = tl.cast(alpha, tl.float32)  # scalars may arrive as fp64 (torch.compile); compute in fp32
    out = acc * alpha
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_D:
        d = tl.load(D + batch * stride_db + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                    mask=inside, other=0.0)
        out += tl.cast(beta, tl.float32) * d.to(tl.float32)
    if HAS_SHIFT:
        out += tl.where(rows[:, None] == cols[None, :], tl.cast(shift, tl.float32), 0.0)
    out = out.to(C.dtype.element_ty)
    C += batch * stride_cb
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out,
             mask=inside & (rows[:, None] <= cols[None, :]))
    # The mirror C[c, r] = C[r, c]: same values, row and column strides swapped.
    tl.store(C + rows[:, None] * stride_cn + cols[None, :] * stride_cm, out,
             mask=inside & (rows[:, None] < cols[None, :]))


@triton.jit
def _fixup_tile(Partial, D, C, Counter, tile, splits, batch, ti, tj, M,
                stride_db, stride_dm, stride_dn, stride_cb, stride_cm, stride_cn,
                alpha, beta, shift, HAS_D: tl.constexpr, HAS_SHIFT: tl.constexpr,
                BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """The last slice of a tile to arrive: the tile's ``splits`` partials summed in slice order
    (fixed, whichever slice runs this), ROWS rows at a time, through the unsplit epilogue; then the
    tile's counter back to zero for the next split launch on this stream."""
    base = Partial + tile.to(tl.int64) * splits * (BLOCK * BLOCK)
    cols = (tj * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    for r0 in range(0, BLOCK, ROWS):
        local = r0 + tl.arange(0, ROWS)
        offsets = local[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for s in range(splits):
            # .cg: from L2, never a stale L1 line (other SMs wrote these partials during this launch).
            acc += tl.load(base + s * (BLOCK * BLOCK) + offsets, cache_modifier=".cg")
        _symmetric_epilogue(acc, D, C, batch, (ti * BLOCK + local).to(tl.int64), cols, M,
                            stride_db, stride_dm, stride_dn, stride_cb, stride_cm, stride_cn,
                            alpha, beta, shift, HAS_D, HAS_SHIFT)
    tl.store(Counter + tile, 0)


@triton.jit
def _symmetric_item(
    item, X, Y, D, C, Partial, Counter, X_desc, Y_desc,
    M, K, splits, k_per_split, per_matrix,
    stride_xb, stride_xm, stride_xk,
    stride_yb, stride_ym, stride_yk,
    stride_db, stride_dm, stride_dn,
    stride_cb, stride_cm, stride_cn,
    alpha, beta, shift,
    HAS_D: tl.constexpr, HAS_SHIFT: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
    ROWS: tl.constexpr,
):
    """One work item: K slice ``item % splits`` of tile ``item // splits`` of the batch's triangles."""
    tile = item // splits
    k_lo = (item - tile * splits) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    b32, ti, tj = _tile_of(tile, per_matrix)
    batch = b32.to(tl.int64)
    # int64 row and column indices: row × stride passes 2^31 inside one large matrix (65536×32768).
    rows_i = (ti * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rows_j = (tj * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)  # a transposed view's k stride is a row stride
    Xb = X + batch * stride_xb
    Yb = Y + batch * stride_yb
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + ks
        # Slices start at multiples of BLOCK_K, so masking at K (not the slice end) is exact,
        # and keeps K's divisibility visible to the compiler (vectorized loads).
        a = load_tile(Xb, X_desc, b32, ti * BLOCK, k0, rows_i, kk, M, K, stride_xm, stride_xk,
                      BLOCK, BLOCK_K, TMA, UPCAST)
        b = load_tile(Yb, Y_desc, b32, tj * BLOCK, k0, rows_j, kk, M, K, stride_ym, stride_yk,
                      BLOCK, BLOCK_K, TMA, UPCAST)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if SPLIT:
        # The whole padded tile, unmasked and contiguous: item-major, so a tile's slices are
        # adjacent. Stored flat: the accumulator's MMA layout with one 64-bit address per element
        # needs more registers than sm_86/89 grant (16 bytes spilled); a flat vector goes out in
        # 16-byte stores after one pass through shared memory.
        flat = tl.cast(item, tl.int64) * (BLOCK * BLOCK) + tl.arange(0, BLOCK * BLOCK)
        tl.store(Partial + flat, tl.reshape(acc, (BLOCK * BLOCK,)))
        # Every thread's partial stores, then one release-acquire increment of the tile's counter
        # (CUTLASS's semaphore pattern: barrier, then a gpu-scope release by one thread). The
        # program that sees splits - 1 arrived last: every other slice's partial is visible to it.
        tl.debug_barrier()
        arrived = tl.atomic_add(Counter + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            _fixup_tile(Partial, D, C, Counter, tile, splits, batch, ti, tj, M,
                        stride_db, stride_dm, stride_dn, stride_cb, stride_cm, stride_cn,
                        alpha, beta, shift, HAS_D, HAS_SHIFT, BLOCK, ROWS)
    else:
        _symmetric_epilogue(acc, D, C, batch, rows_i, rows_j, M,
                            stride_db, stride_dm, stride_dn, stride_cb, stride_cm, stride_cn,
                            alpha, beta, shift, HAS_D, HAS_SHIFT)


@triton.jit
def _symmetric_matmul_kernel(
    X, Y, D, C, Partial, Counter, X_desc, Y_desc,
    M, K, items, splits, k_per_split,
    stride_xb, stride_xm, stride_xk,
    stride_yb, stride_ym, stride_yk,
    stride_db, stride_dm, stride_dn,
    stride_cb, stride_cm, stride_cn,
    alpha, beta, shift,
    HAS_D: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    PERSISTENT: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Work items are (tile, K slice) pairs, slice fastest, over the batch folded into grid axis 0
    # (axis 1 stops at 65,535 on a GPU; the interpreter never says so): one program per item, or
    # (PERSISTENT) fewer programs striding over the items. Only the persistent kernel has the outer
    # loop: around a plain launch it costs registers (Triton 3.6 spilled a·X + B·X at 128×64).
    # Program ids fit int32, so the divisions stay 32-bit (a 64-bit one is a called routine with a
    # stack frame); the batch offset is int64: batch × stride overflows int32 for big stacks.
    tiles = tl.cdiv(M, BLOCK)
    per_matrix = tiles * (tiles + 1) // 2
    if PERSISTENT:
        for item in range(tl.program_id(0), items, tl.num_programs(0)):
            _symmetric_item(item, X, Y, D, C, Partial, Counter, X_desc, Y_desc, M, K, splits, k_per_split, per_matrix,
                            stride_xb, stride_xm, stride_xk, stride_yb, stride_ym, stride_yk,
                            stride_db, stride_dm, stride_dn, stride_cb, stride_cm, stride_cn, alpha, beta, shift,
                            HAS_D, HAS_SHIFT, SPLIT, BLOCK, BLOCK_K, UPCAST, PRECISION, TMA, ROWS)
    else:
        _symmetric_item(tl.program_id(0), X, Y, D, C, Partial, Counter, X_desc, Y_desc, M, K, splits, k_per_split, per_matrix,
                        stride_xb, stride_xm, stride_xk, stride_yb, stride_ym, stride_yk,
                        stride_db, stride_dm, stride_dn, stride_cb, stride_cm, stride_cn, alpha, beta, shift,
                        HAS_D, HAS_SHIFT, SPLIT, BLOCK, BLOCK_K, UPCAST, PRECISION, TMA, ROWS)


@functools.lru_cache(maxsize=4096)  # a handful of shapes per model; the split search costs ~10 µs of host time
def launch_shape(batch: int, m: int, k: int, cfg: MatmulConfig, sms: int) -> tuple[int, int, int, int]:
    """(tiles, splits, k_per_split, programs) of a symmetric product: the triangle's tiles over the
    batch, the K split (``cfg.split_k``, or ``split_factor`` when 0), the K range of one slice (a
    multiple of BLOCK_K, so that no slice is empty), and the grid (persistent: at most one per SM)."""
    side = cdiv(m, cfg.block_m)
    if side * (side + 1) // 2 > _TRIANGLE_TILES_MAX:
        raise ValueError(f"symmetric_matmul: a {m}×{m} product has more than {_TRIANGLE_TILES_MAX} tiles of "
                         f"{cfg.block_m}×{cfg.block_m}, which the kernel's int32 tile coordinates cannot address")
    tiles = side * (side + 1) // 2 * batch
    iterations = cdiv(k, cfg.block_k)
    splits = cfg.split_k or split_factor(tiles, iterations, sms)
    splits = max(1, min(splits, iterations))
    k_per_split = max(1, cdiv(iterations, splits)) * cfg.block_k  # K = 0: one empty slice
    splits = max(1, cdiv(k, k_per_split))
    items = tiles * splits
    return tiles, splits, k_per_split, persistent_programs(items, sms) if cfg.persistent else items


def symmetric_matmul(
    X: torch.Tensor,
    *,
    Y: torch.Tensor | None = None,
    alpha: float = 1.0,
    D: torch.Tensor | None = None,
    beta: float = 0.0,
    shift: float = 0.0,
    out: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
    fp32_precision: str = "ieee",
) -> torch.Tensor:
    """``alpha·X·Yᵀ + beta·D + shift·I`` for (batch, m, k) stacks ``X`` and ``Y`` (default: X; any
    strides); returns (batch, m, m), computed from upper-triangle tiles and mirrored.

    The result must be symmetric for the mirror to be right: Y = X, or X and Y symmetric and
    commuting (so X·Yᵀ = X·Y = Y·X). ``D`` must be symmetric (only its upper-triangle tiles are
    read). ``out`` must not alias X, Y or D. ``fp32_precision`` picks ``"ieee"`` or ``"tf32"``
    for fp32 operands; it is ignored for bf16/fp16.
    """
    if X.ndim != 3:
        raise ValueError(f"symmetric_matmul: X must be (batch, m, k), got shape {tuple(X.shape)}")
    batch, m, k = X.shape
    if Y is not None and Y.shape != X.shape:
        raise ValueError(f"symmetric_matmul: Y must be {tuple(X.shape)}, got {tuple(Y.shape)}")
    Y = X if Y is None else Y
    if out is None:
        out = workspace.empty((batch, m, m), dtype=X.dtype, device=X.device)
    if D is not None and D.shape != (batch, m, m):
        raise ValueError(f"symmetric_matmul: D must be {(batch, m, m)}, got {tuple(D.shape)}")
    if batch == 0 or m == 0:
        return out
    cfg = config or autotune.choose(
        "symmetric", X.device, X.dtype, m, m, k,
        lambda c: symmetric_matmul(X, Y=Y, alpha=alpha, D=D, beta=beta, shift=shift, config=c,
                                   fp32_precision=fp32_precision))
    sms = sm_count(X.device)
    tiles, splits, k_per_split, programs = launch_shape(batch, m, k, cfg, sms)
    block = cfg.block_m
    x_desc = descriptor(X, (block, cfg.block_k)) if cfg.tma else None
    y_desc = descriptor(Y, (block, cfg.block_k)) if cfg.tma else None
    tma = x_desc is not None and y_desc is not None
    dummy = D if D is not None else out  # never read when HAS_D is False
    if splits > 1:
        partial = workspace.empty((tiles * splits, block, block), dtype=torch.float32, device=X.device)
        counters = COUNTERS.get(X.device, tiles)
    else:
        partial = counters = out  # never read without a split
    try:
        launch(_symmetric_matmul_kernel, (checked_grid(programs, "symmetric_matmul"),),
            X, Y, dummy, out, partial, counters, x_desc if tma else None, y_desc if tma else None,
            m, k, tiles * splits, splits, k_per_split,
            *X.stride(), *Y.stride(), *dummy.stride(), *out.stride(),
            float(alpha), float(beta), float(shift),
            SPLIT=splits > 1,
            BLOCK=block,
            BLOCK_K=cfg.block_k,
            UPCAST=upcast_for(X),
            PRECISION=precision_for(X.dtype, fp32_precision),
            TMA=tma,
            PERSISTENT=cfg.persistent,
            ROWS=fixup_rows(block, X.element_size(), arch_of(X.device.index) if X.is_cuda else 0),
            HAS_D=D is not None,
            HAS_SHIFT=shift != 0.0,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            enable_fp_fusion=FP_FUSION,
        )
    except BaseException:
        if splits > 1:
            COUNTERS.forget(counters)
        raise
    return out
