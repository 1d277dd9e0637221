"""Batched Newton–Schulz on a stack of same-shape matrices, a handful of launches per bucket.

Per call: two launches normalize and cast the whole stack (per-tile scaled sums of squares, each
matrix's reduced once, in a fixed order, by its last tile to finish; then the scale-and-cast into
the iteration dtype);
per step three launches: ``A = X·Xᵀ`` and ``B = b·A + c·A·A`` (symmetric, upper-triangle tiles
only; split along K, reduced in the same launch, when they have few tiles) and ``X' = a·X + B·X``
(the a·X term in the epilogue, into a second buffer — no copies). Gram NS runs its own driver,
``gram_newton_schulz``, on the same kernels. ``cublas_newton_schulz`` keeps the normalization and
hands the products to cuBLAS.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import recurrence, workspace
from ..backends import torch_backend
from ..ns_config import NSConfig
from . import autotune
from .config import (FP_FUSION, MatmulConfig, cdiv, checked_grid, is_interpreting, persistent_programs,
                     precision_for, sm_count, upcast_for)
from .descriptors import descriptor, load_tile
from .symmetric_matmul import symmetric_matmul
from .launch import launch

# Normalization tiles: 64×256 elements keep the per-matrix partial count small (an 8192² matrix
# has 4096 partials), and the interpreter gets small tiles so tests cover several of them.
_NORM_TILE = (64, 256)
_NORM_TILE_INTERPRETER = (16, 32)
_PARTIALS_BLOCK = 1024


@triton.jit
def _exponent_field(x):
    """The biased exponent of fp32 ``x`` >= 0, clamped to [1, 253] so that 2^e and 2^-e are both normal."""
    e = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.minimum(tl.maximum(e, 1), 253)


@triton.jit
def _power_of_two(field):
    """2^(field - 127) from a biased exponent field, exactly."""
    return (field << 23).to(tl.float32, bitcast=True)


@triton.jit
def _sum_squares_kernel(
    G, Partial, Norm, Counter,
    R, C, tiles_c, tiles,
    stride_gb, stride_gr, stride_gc,
    norm_scale, norm_offset, floor,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Per tile: (s, Σ(x/s)²) with s a power of two near the tile's largest |x| — BLAS nrm2's scaled
    sum of squares, so no tile overflows (|x| up to fp32's max) or underflows (|x| down to 1e-38).
    The matrix's last tile to finish reduces its partials into (1/S, divisor): see _matrix_norm."""
    # The batch is folded into axis 0 (axis 1 stops at 65,535). Program ids fit int32, so the
    # division stays 32-bit (a 64-bit one is a called routine with a stack frame); offsets are int64.
    pid = tl.program_id(0)
    batch = pid // tiles
    t = (pid - batch * tiles).to(tl.int64)
    batch = batch.to(tl.int64)
    rows = (t // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    g = tl.load(G + batch * stride_gb + rows[:, None] * stride_gr + cols[None, :] * stride_gc, mask=mask, other=0.0)
    g = g.to(tl.float32)
    field = _exponent_field(tl.max(tl.max(tl.abs(g), axis=1), axis=0))
    y = g * _power_of_two(254 - field)  # exact: a power-of-two scale
    tl.store(Partial + batch * 2 * tiles + t, _power_of_two(field))
    tl.store(Partial + batch * 2 * tiles + tiles + t, tl.sum(tl.sum(y * y, axis=1), axis=0))
    # The program's stores, then one release-acquire count at the matrix's counter (the split
    # products' pattern, symmetric_matmul): the program that sees tiles - 1 arrived last, and every
    # other tile's partial is visible to it.
    tl.debug_barrier()
    arrived = tl.atomic_add(Counter + batch, 1, sem="acq_rel", scope="gpu")
    if arrived == tiles - 1:
        _matrix_norm(Partial + batch * 2 * tiles, Norm + batch * 2, tiles, norm_scale, norm_offset, floor, BLOCK_P)
        tl.store(Counter + batch, 0)  # back to zero for the next launch on this stream


@triton.jit
def _matrix_norm(Partial, Norm, tiles, norm_scale, norm_offset, floor, BLOCK_P: tl.constexpr):
    """One matrix's partials, reduced once in a fixed order (whichever program runs this): one norm
    per matrix, bit-identical across runs, with no float atomics. The tiles' sums are rescaled to
    the matrix's largest tile scale S (powers of two: exact), and the divisor stays in units of S.
    Stores (1/S, divisor) for the scale-and-cast launch: each of its programs reads 8 bytes (it used
    to reduce all the partials itself: 12 bytes per tile per program, ~50 GB of L2 reads for one
    8192×131072 matrix)."""
    top = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, tiles, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        # .cg: from L2, never a stale L1 line (other SMs wrote these partials during this launch).
        top = tl.maximum(top, tl.load(Partial + p, mask=p < tiles, other=0.0, cache_modifier=".cg"))
    inv = _power_of_two(254 - _exponent_field(tl.max(top, axis=0)))  # 1/S
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, tiles, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ratio = tl.load(Partial + p, mask=p < tiles, other=0.0, cache_modifier=".cg") * inv
        acc += tl.load(Partial + tiles + p, mask=p < tiles, other=0.0, cache_modifier=".cg") * (ratio * ratio)
    # Round-to-nearest sqrt and division, as torch computes them (tl.sqrt and / compile to the
    # approximate sqrt.approx / div.full on a GPU, which the CPU interpreter cannot show).
    norm = tl.math.sqrt_rn(tl.sum(acc, axis=0))
    # propagate_nan: a NaN norm must stay NaN (like torch's clamp_min), not be replaced by the floor.
    denom = tl.maximum(norm * tl.cast(norm_scale, tl.float32) + tl.cast(norm_offset, tl.float32) * inv,
                       tl.cast(floor, tl.float32) * inv, propagate_nan=tl.PropagateNan.ALL)
    tl.store(Norm, inv)
    tl.store(Norm + 1, denom)


@triton.jit
def _scale_cast_kernel(
    G, Norm, Out,
    R, C, tiles_c, tiles,
    stride_gb, stride_gr, stride_gc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = pid // tiles
    t = (pid - batch * tiles).to(tl.int64)
    batch = batch.to(tl.int64)
    inv = tl.load(Norm + batch * 2)
    denom = tl.load(Norm + batch * 2 + 1)
    rows = (t // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    g = tl.load(G + batch * stride_gb + rows[:, None] * stride_gr + cols[None, :] * stride_gc, mask=mask, other=0.0)
    x = tl.math.div_rn(g.to(tl.float32) * inv, denom).to(Out.dtype.element_ty)
    tl.store(Out + batch * R * C + rows[:, None] * C + cols[None, :], x, mask=mask)


@triton.jit
def _ns_update_item(
    item, B, X, Out, B_desc, X_desc,
    M, N, tiles_m, tiles_n,
    stride_bb, stride_bm, stride_bk,
    stride_xb, stride_xm, stride_xn,
    stride_ob, stride_om, stride_on,
    a,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """Output tile ``item`` of the batch; grouped tile order so B's row panels stay in L2."""
    b32 = item // (tiles_m * tiles_n)
    pid = item - b32 * tiles_m * tiles_n
    batch = b32.to(tl.int64)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pm = first_m + (pid % per_group) % group_size
    pn = (pid % per_group) // group_size
    B += batch * stride_bb
    X += batch * stride_xb
    # int64 indices: row × stride passes 2^31 inside one large matrix.
    rows = (pm * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pn * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        kk = k0 + ks
        b = load_tile(B, B_desc, b32, pm * BLOCK_M, k0, rows, kk, M, M, stride_bm, stride_bk,
                      BLOCK_M, BLOCK_K, TMA, UPCAST)
        x = load_tile(X, X_desc, b32, k0, pn * BLOCK_N, kk, cols, M, N, stride_xm, stride_xn,
                      BLOCK_K, BLOCK_N, TMA, UPCAST)
        acc = tl.dot(b, x, acc, input_precision=PRECISION)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x_tile = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    out = acc + tl.cast(a, tl.float32) * x_tile.to(tl.float32)
    tl.store(Out + batch * stride_ob + rows[:, None] * stride_om + cols[None, :] * stride_on,
             out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _ns_update_kernel(
    B, X, Out, B_desc, X_desc,
    M, N, items,
    stride_bb, stride_bm, stride_bk,
    stride_xb, stride_xm, stride_xn,
    stride_ob, stride_om, stride_on,
    a,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Out = a·X + B·X with B (M×M), X (M×N). Gram NS's Q·X is a = 0: it reads the X tile anyway
    (one m×n read per call, ~1% of a Gram call at 1024×4096): an epilogue without it compiled to
    a different register budget that ptxas spilled on sm_120 at both tile sizes."""
    # The batch is folded into grid axis 0 (axis 1 stops at 65,535 on a GPU); program ids fit int32,
    # so the divisions stay 32-bit (a 64-bit one is a called routine with a stack frame). One
    # program per tile, or (PERSISTENT) fewer programs striding over the tiles; only the persistent
    # kernel has that outer loop (around a plain launch Triton 3.6 spilled the 128×64 config).
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:
        for item in range(tl.program_id(0), items, tl.num_programs(0)):
            _ns_update_item(item, B, X, Out, B_desc, X_desc, M, N, tiles_m, tiles_n,
                            stride_bb, stride_bm, stride_bk, stride_xb, stride_xm, stride_xn,
                            stride_ob, stride_om, stride_on, a,
                            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, UPCAST, PRECISION, TMA)
    else:
        _ns_update_item(tl.program_id(0), B, X, Out, B_desc, X_desc, M, N, tiles_m, tiles_n,
                        stride_bb, stride_bm, stride_bk, stride_xb, stride_xm, stride_xn,
                        stride_ob, stride_om, stride_on, a,
                        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, UPCAST, PRECISION, TMA)


def normalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``stack / max(norm_scale·‖stack‖_F + norm_offset, floor)`` per matrix into a new contiguous
    (k, m, n) tensor of ``ns_dtype`` (or ``out``: the stack's own memory may be it, each tile is read
    before it is written); ``stack`` may be any strided view (a transposed one included).
    An fp64 stack (fp64 parameters) is normalized by the torch backend, in fp64: these kernels scale
    in fp32, where an entry beyond fp32's range (|x| > 3.4e38) would be inf and the matrix NaN."""
    if stack.dtype == torch.float64:
        normalized = torch_backend.normalize(stack, config, ns_dtype)
        return normalized if out is None else out.copy_(normalized)
    k, r, c = stack.shape
    out = workspace.empty((k, r, c), dtype=ns_dtype, device=stack.device) if out is None else out
    if out.numel() == 0:
        return out
    br, bc = _NORM_TILE_INTERPRETER if is_interpreting() else _NORM_TILE
    tiles_c = cdiv(c, bc)
    tiles = cdiv(r, br) * tiles_c
    partial = workspace.empty((k, 2, tiles), dtype=torch.float32, device=stack.device)
    norm = workspace.empty((k, 2), dtype=torch.float32, device=stack.device)
    counters = workspace.COUNTERS.get(stack.device, k)
    grid = (checked_grid(tiles * k, "normalize"),)
    try:
        launch(_sum_squares_kernel, grid, stack, partial, norm, counters, r, c, tiles_c, tiles, *stack.stride(),
               float(config.norm_scale), float(config.norm_offset), float(config.floor),
               BLOCK_R=br, BLOCK_C=bc, BLOCK_P=_PARTIALS_BLOCK, enable_fp_fusion=FP_FUSION)
    except BaseException:
        workspace.COUNTERS.forget(counters)  # an interrupted launch may leave some counters above zero
        raise
    launch(_scale_cast_kernel, grid, stack, norm, out, r, c, tiles_c, tiles, *stack.stride(),
           BLOCK_R=br, BLOCK_C=bc, enable_fp_fusion=FP_FUSION)
    return out


def ns_update(B: torch.Tensor, X: torch.Tensor, a: float, *, out: torch.Tensor | None = None,
              config: MatmulConfig | None = None, fp32_precision: str = "ieee") -> torch.Tensor:
    """``a·X + B·X`` for stacks B (k, m, m) and X (k, m, n); ``out`` must not alias X (nor B)."""
    k, m, n = X.shape
    if B.shape != (k, m, m):
        raise ValueError(f"ns_update: B must be {(k, m, m)}, got {tuple(B.shape)}")
    if out is None:
        out = workspace.empty_like(X)
    if out.numel() == 0:
        return out
    cfg = config or autotune.choose("ns_update", X.device, X.dtype, m, n, m,
                                    lambda c: ns_update(B, X, a, config=c, fp32_precision=fp32_precision))
    items = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n) * k
    programs = persistent_programs(items, sm_count(X.device)) if cfg.persistent else items
    b_desc = descriptor(B, (cfg.block_m, cfg.block_k)) if cfg.tma else None
    x_desc = descriptor(X, (cfg.block_k, cfg.block_n)) if cfg.tma else None
    tma = b_desc is not None and x_desc is not None
    launch(_ns_update_kernel, (checked_grid(programs, "ns_update"),),
        B, X, out, b_desc if tma else None, x_desc if tma else None, m, n, items,
        *B.stride(), *X.stride(), *out.stride(), float(a),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        UPCAST=upcast_for(X), PRECISION=precision_for(X.dtype, fp32_precision), TMA=tma,
        PERSISTENT=cfg.persistent, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )
    return out


def consumed(stack: torch.Tensor, ns_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What a stack the caller gives up can hold, as (normalized X, the products' other m×n buffer):
    X over the stack itself where their elements are as wide (normalization reads a tile before it
    writes it), else the other buffer over the stack's memory where it fits (an fp32 stack, a 16-bit
    iteration: the stack is dead once X is normalized). Either way the call allocates one m×n buffer
    fewer; (None, None) for a non-contiguous or a narrower stack."""
    if stack.element_size() == ns_dtype.itemsize:
        return workspace.reinterpret(stack, ns_dtype, tuple(stack.shape)), None
    return None, workspace.reinterpret(stack, ns_dtype, tuple(stack.shape))


def matmul_ops(fp32_precision: str = "ieee", outputs: recurrence.Outputs | None = None) -> recurrence.MatmulOps:
    """The three products of a recurrence on these kernels: X·Xᵀ and b·A + c·A·A on the symmetric
    (upper-tile, mirrored) kernel, a·X + B·X on the fused-epilogue one; Gram NS on
    ``gram_newton_schulz``, the same schedule on fused symmetric products. The products write into
    ``outputs`` (one call's, for the standard schedule: ``recurrence.Outputs``), else fresh buffers."""

    def gram(X):
        return symmetric_matmul(X, out=outputs.gram(X) if outputs else None, fp32_precision=fp32_precision)

    def poly(A, b, c):
        return symmetric_matmul(A, alpha=c, D=A, beta=b, out=outputs.poly(A) if outputs else None,
                                fp32_precision=fp32_precision)

    def apply(B, X, a):
        return ns_update(B, X, a, out=outputs.apply(X) if outputs else None, fp32_precision=fp32_precision)

    driver = functools.partial(gram_newton_schulz, fp32_precision=fp32_precision,
                               spare=outputs.second if outputs else None)
    return recurrence.MatmulOps(gram=gram, poly=poly, apply=apply, gram_driver=driver, outputs=outputs)


class _Slots:
    """m×m buffers of one workspace allocation, handed out and taken back by the Gram driver."""

    def __init__(self, count: int, k: int, m: int, dtype: torch.dtype, device: torch.device):
        self.free = list(workspace.empty((count, k, m, m), dtype=dtype, device=device).unbind(0))

    def take(self) -> torch.Tensor:
        return self.free.pop()

    def give(self, t: torch.Tensor) -> None:
        self.free.append(t)


def gram_newton_schulz(X: torch.Tensor, coefficients, restarts: tuple[int, ...], R: torch.Tensor | None = None,
                       fp32_precision: str = "ieee", cublas_qx: bool = False,
                       spare: torch.Tensor | None = None) -> torch.Tensor:
    """Gram Newton–Schulz on a normalized (k, m, n) stack: muon_kernels.recurrence.gram's schedule
    (same steps, same restarts, same final Q·X) with fewer launches, FLOPs and allocations.

    Every polynomial map of one epoch (from a (re)start) is a polynomial in the same R, so all the
    m×m matrices commute and every m×m product is symmetric. Hence:
    - P = p(R) = b·R + c·R·R + a·I in one symmetric launch (the shift in its epilogue): the
      recurrence's Z = b·R + c·R·R, its clone and its diagonal add are one launch here, and every
      later use of Z is through P (R·Z + a·R = R·P, Z·Q + a·Q = Q·P);
    - Q ← Q·P, and the R update R ← P·(R·P), run on the symmetric kernel (upper tiles, mirrored):
      half the FLOPs of the recurrence's full a·X + B·X products, and R stays exactly symmetric;
    - one allocation of four m×m slots (never more are live: R, P, Q and a product in flight) and
      one m×n buffer that X and its restarts ping-pong with.
    Launches for 5 steps restarted before 1 and 3 (the 16-bit default): 17, as many as standard NS
    (the recurrence: 17 products plus 3 clones and 3 diagonal adds), split products included.
    ``R`` = X·Xᵀ when the caller has it (AOL formed it). X's buffer is scratch: restarts and the
    final Q·X ping-pong between it and the spare, so the result may live in it (``newton_schulz``
    passes its own normalized copy).
    ``cublas_qx``: the m×n products Q·X (restarts, the result) on cuBLAS's batched GEMM instead of
    the a·X + B·X kernel (the "symmetric-cublas" path). ``spare``: X's partner where the caller has
    one (a consumed stack's memory), else a fresh buffer."""
    k, m, n = X.shape
    if not coefficients or X.numel() == 0:
        return X
    slots = _Slots(4, k, m, X.dtype, X.device)
    if spare is None:
        spare = workspace.empty_like(X)  # X's partner: restarts write Q·X here, then the two swap
    else:
        spare = workspace.poisoned(spare)
    sym = functools.partial(symmetric_matmul, fp32_precision=fp32_precision)

    def qx(Q, X, out):
        return torch.bmm(Q, X, out=out) if cublas_qx else ns_update(Q, X, 0.0, out=out, fp32_precision=fp32_precision)

    if R is None:
        R = sym(X, out=slots.take())
    Q = None
    for i, (a, b, c) in enumerate(coefficients):
        if i in restarts:
            X, spare = qx(Q, X, spare), X
            slots.give(Q)
            slots.give(R)
            R = sym(X, out=slots.take())
            Q = None
        P = sym(R, alpha=c, D=R, beta=b, shift=a, out=slots.take())
        if Q is None:
            Q = P  # first step of an epoch: Q = p(R), no product
        else:
            product = sym(Q, Y=P, out=slots.take())
            slots.give(Q)
            Q = product
        if i + 1 < len(coefficients) and i + 1 not in restarts:
            RP = sym(R, Y=P, out=slots.take())
            slots.give(R)
            R = sym(P, Y=RP, out=slots.take())  # p(R)·R·p(R)
            slots.give(RP)
        if P is not Q:
            slots.give(P)
    return qx(Q, X, spare)


def _run(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype, make_ops, consume: bool) -> torch.Tensor:
    """Normalize, then the recurrence over ``make_ops``'s products, writing into one set of buffers
    (``recurrence.run_owned``); with ``consume`` the stack's memory is among them (``consumed``)."""
    over, second = consumed(stack, ns_dtype) if consume else (None, None)
    return recurrence.run_owned(normalize(stack, config, ns_dtype, out=over), config, ns_dtype, make_ops, second)


def cublas_newton_schulz(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype,
                         consume: bool = False) -> torch.Tensor:
    """The same recurrence with this module's two-launch normalization and cuBLAS's batched GEMMs
    for the products (``recurrence.BATCHED_GEMM_OPS``): where cuBLAS's tiles beat the symmetric
    kernel (few output tiles, no split that pays), without the torch backend's ~15 small
    normalization ops, each a launch and a few µs of host time."""
    return _run(stack, config, ns_dtype, recurrence.batched_gemm_ops, consume)


def symmetric_cublas_newton_schulz(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype,
                                   consume: bool = False) -> torch.Tensor:
    """The recurrence with X·Xᵀ and b·A + c·A·A on the symmetric kernel (upper tiles: half their
    FLOPs) and a·X + B·X on cuBLAS's batched GEMM. a·X + B·X is the one product of a step that is
    not symmetric — 2m²n of the 3m²n + m³ FLOPs the symmetric path executes per step, half of them
    at a square shape. On the H200 cuBLAS's recurrence (torch.optim.Muon's) ran 4096² at 715
    TFLOP/s and its GEMM set the 802 TFLOP/s ceiling at 8192³, while the symmetric path executed
    ~533 TFLOP/s at 4096² (its kernels at ~66% of that ceiling). Where cuBLAS's GEMM beats the
    Triton a·X + B·X kernel, this path keeps the symmetric products' FLOP saving and cuBLAS's rate
    on the rest. Gram NS likewise: its m×m products on the symmetric kernel, Q·X on cuBLAS. A path
    for the measuring mode to time."""
    def ops(outputs):
        driver = functools.partial(gram_newton_schulz, cublas_qx=True, spare=outputs.second if outputs else None)
        return matmul_ops(outputs=outputs)._replace(apply=recurrence.batched_gemm_ops(outputs).apply,
                                                    gram_driver=driver)

    return _run(stack, config, ns_dtype, ops, consume)


def newton_schulz(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype, fp32_precision: str = "ieee",
                  consume: bool = False) -> torch.Tensor:
    """The whole recurrence on a (k, m, n) stack with m <= n; returns a (k, m, n) ``ns_dtype`` tensor:
    a new one, or with ``consume`` (the caller gives the stack up) possibly over the stack's memory.
    Standard NS, Gram NS and AOL all run muon_kernels.recurrence over these kernels (``matmul_ops``)."""
    return _run(stack, config, ns_dtype, functools.partial(matmul_ops, fp32_precision), consume)
