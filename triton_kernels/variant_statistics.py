"""The statistics pass of the post-orthogonalization variants (muon_kernels/variants.py), one launch
per bucket: per output neuron i of each matrix, q_i = Σ_j O_ij² and, for the hyperball, Σ_j W_ij·O_ij
and Σ_j W_ij²; NorMuon's v_i ← lerp(v_i, q_i / inputs, 1 - β2) (in the state tensor, in place) and
s_i = 1 / (√v_i + ε) (into ``row_scale``); and per (matrix, block of neurons) the partial sums
Σq, Σs²q, Σs·(W·O), ΣW² (a tiny (K, blocks, 4) tensor). A second launch, one program per matrix,
adds them up in a fixed order and turns them into the two scalars the fused update applies (g and the
hyperball's c, in fp64 as ``variants.gains``): one launch where the same math as torch ops took ~30
small ones per bucket, each with its host cost.

Programs: one per (matrix, block of BLOCK_N neurons), on grid axis 0; each walks the other axis in BLOCK_J steps,
so the reduction order is fixed (deterministic, no atomics). Neurons are rows of the (out, in)
matrix, or columns of a weight stored (in, out); the matrix sits in the stack transposed when it
is tall. A per-matrix table gives its parameter and state addresses and that geometry.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import variants
from .config import cdiv, checked_grid, fp_fusion, is_interpreting, rounds_as_written
from .fused_update import _TL_DTYPES, _lerp, int_table
from .launch import launch

# per matrix: param, v (0: none), rows, cols, transposed, neurons on cols, the param's row stride
TABLE_COLUMNS: tl.constexpr = tl.constexpr(variants.TABLE_COLUMNS)
SUMS: tl.constexpr = tl.constexpr(4)  # per (matrix, block of neurons): Σq, Σs²q, Σs·(W·O), ΣW²
BLOCK_N = 16
BLOCK_J = 64
_BLOCK_J_INTERPRETER = 16


@triton.jit
def _neuron_sums(O, W, i, live, length, o_stride_i, o_stride_j, w_stride_i, w_stride_j,
                 HYPERBALL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per neuron i of the block: Σ_j O_ij², and for the hyperball Σ_j W_ij·O_ij and Σ_j W_ij², over
    ``length`` elements j in BLOCK_J steps. The strides are literals at each call (one of each pair
    is 1), so the compiler sees which axis is contiguous and loads it in 16-byte vectors."""
    # Elementwise accumulation, one reduction across lanes after the loop: a tl.sum per step was
    # ~60 warp shuffles per step in the loop.
    q = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    wo = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    w2 = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    for j0 in range(0, length, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        mask = live[:, None] & (j < length)[None, :]
        o = tl.load(O + i[:, None] * o_stride_i + j[None, :] * o_stride_j, mask=mask, other=0.0).to(tl.float32)
        q += o * o
        if HYPERBALL:
            w = tl.load(W + i[:, None] * w_stride_i + j[None, :] * w_stride_j, mask=mask, other=0.0).to(tl.float32)
            wo += w * o
            w2 += w * w
    q = tl.sum(q, axis=1)
    wo = tl.sum(wo, axis=1)
    w2 = tl.sum(w2, axis=1)
    return q, wo, w2


@triton.jit
def _variant_statistics_kernel(
    Ortho, Table, RowScale, Partials, M, N, BLOCKS, weight, eps,
    PARAM_DTYPE: tl.constexpr, NORMUON: tl.constexpr, HYPERBALL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, EMULATE_RN: tl.constexpr,
):
    # Addressed in the stack's coordinates: matrix k is M×N, row-major (its element (a, b) at
    # a·N + b), and its parameter holds (a, b) at a·ld + b, or at b·ld + a where it sits in the stack
    # transposed (ld: the parameter's row stride, N or M unless it is a column slice of a wider one). Neurons are the stack's rows where the parameter's neuron axis maps to them
    # (rows of an untransposed matrix, columns of a transposed one), else its columns. Each of the
    # four cases is its own loop with literal unit strides (a branch per program: the whole program
    # works on one matrix): with the orientation chosen per element, as before, every load was
    # one instruction per element behind 64-bit address arithmetic.
    # (matrix, block) folded into grid axis 0: axis 1 stops at 65,535 blocks (n = 1,048,560 neurons).
    # Program ids fit int32, so the division stays 32-bit.
    pid = tl.program_id(0)
    k32 = pid // BLOCKS
    nb = pid - k32 * BLOCKS
    k = k32.to(tl.int64)
    row = Table + k * TABLE_COLUMNS
    transposed = tl.load(row + 4) != 0
    on_rows = transposed == (tl.load(row + 5) != 0)  # neurons on the stack's rows
    # int64 scalars made with tl.full: on a GPU Triton turns an int argument equal to 1 into a
    # constant (a Python int, no .to), as for a 1×n matrix's stack.
    m = tl.full([], M, tl.int64)
    n = tl.full([], N, tl.int64)
    count = tl.where(on_rows, m, n)
    other = tl.where(on_rows, n, m)
    i = nb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    live = i < count
    # A block past this matrix's neurons (the grid covers the stack's larger side) walks nothing
    # and stores zero sums, instead of issuing a loop of fully masked loads.
    length = tl.where(nb * BLOCK_N < count, other, 0)
    O = Ortho + k * m * n
    W = tl.load(row).to(tl.pointer_type(PARAM_DTYPE))
    ld = tl.load(row + 6)
    if on_rows:
        if transposed:
            q, wo, w2 = _neuron_sums(O, W, i, live, length, n, 1, 1, ld, HYPERBALL, BLOCK_N, BLOCK_J)
        else:
            q, wo, w2 = _neuron_sums(O, W, i, live, length, n, 1, ld, 1, HYPERBALL, BLOCK_N, BLOCK_J)
    else:
        if transposed:
            q, wo, w2 = _neuron_sums(O, W, i, live, length, 1, n, ld, 1, HYPERBALL, BLOCK_N, BLOCK_J)
        else:
            q, wo, w2 = _neuron_sums(O, W, i, live, length, 1, n, 1, ld, HYPERBALL, BLOCK_N, BLOCK_J)
    s = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if NORMUON:
        v_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        v = tl.load(v_ptr + i, mask=live, other=0.0)
        w_ema = tl.zeros([BLOCK_N], dtype=tl.float32) + weight  # a tensor: the interpreter passes a Python float
        v = _lerp(v, tl.div_rn(q, other.to(tl.float32)), w_ema, EMULATE_RN)  # torch's lerp_, as the reference
        tl.store(v_ptr + i, v, mask=live)
        s = tl.div_rn(1.0, tl.sqrt_rn(v) + eps)
        tl.store(RowScale + k * n + i, s, mask=live)
    s = tl.where(live, s, 0.0)
    out = Partials + (k * BLOCKS + nb) * SUMS
    tl.store(out + 0, tl.sum(q, axis=0))
    tl.store(out + 1, tl.sum(s * s * q, axis=0))
    tl.store(out + 2, tl.sum(s * wo, axis=0))
    tl.store(out + 3, tl.sum(w2, axis=0))


def matrix_table(params, vs, views, device: torch.device) -> torch.Tensor:
    """The per-matrix table (int64, TABLE_COLUMNS per matrix): ``views`` per parameter is
    (batch, rows, cols, transposed, neurons on columns, neurons per matrix); ``vs`` the NorMuon
    state per parameter, or empty. Cached by value, so a step whose tensors did not move copies
    nothing to the device."""
    return int_table(variants.matrix_table(params, vs, views), device)


def blocks(n: int) -> int:
    """Blocks of neurons per matrix (n: the stack's larger dimension, the most neurons a matrix has)."""
    return cdiv(n, BLOCK_N)


def variant_statistics(ortho: torch.Tensor, table: torch.Tensor, row_scale: torch.Tensor | None, *, param_dtype,
                       normuon: bool, hyperball: bool, beta2: float, eps: float) -> torch.Tensor:
    """Runs the pass over the (K, m, n) stack ``ortho``; returns the (K, blocks, 4) fp32 partial sums.
    ``row_scale`` ((K, n) fp32) receives s for NorMuon; the state tensors are updated in place."""
    k, m, n = ortho.shape
    nb = blocks(n)
    partials = torch.empty((k, nb, SUMS.value), dtype=torch.float32, device=ortho.device)
    grid = (checked_grid(k * nb, "variant_statistics"),)
    launch(_variant_statistics_kernel, grid,
        ortho, table, row_scale if row_scale is not None else partials, partials, m, n, nb, 1.0 - beta2, eps,
        PARAM_DTYPE=_TL_DTYPES[param_dtype], NORMUON=normuon, HYPERBALL=hyperball, BLOCK_N=BLOCK_N,
        BLOCK_J=_BLOCK_J_INTERPRETER if is_interpreting() else BLOCK_J, EMULATE_RN=is_interpreting(),
        enable_fp_fusion=fp_fusion(_variant_statistics_kernel),
    )
    return partials


@triton.jit
def _pick(values, j: tl.constexpr):
    """Element j of a small vector, as an fp64 scalar."""
    return tl.sum(tl.where(tl.arange(0, SUMS) == j, values, 0.0), axis=0).to(tl.float64)


# Rounds as written: torch computes each product and sum of variants.gains separately.
@rounds_as_written
@triton.jit
def _variant_factors_kernel(
    Partials, Alphas, Radius, Eps, Gains, Shrink, BLOCKS,
    NORMUON: tl.constexpr, HYPERBALL: tl.constexpr, CHUNK: tl.constexpr,
):
    """One matrix: its blocks' partial sums added in a fixed order (CHUNK strided lanes, then a tree:
    the same bits every run, not torch's order),
    then ``variants.gains``'s formulas in fp64, operation for operation."""
    k = tl.program_id(0).to(tl.int64)
    base = Partials + k * BLOCKS * SUMS
    cols = tl.arange(0, SUMS)
    acc = tl.zeros([CHUNK, SUMS], dtype=tl.float32)
    for b0 in range(0, BLOCKS, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        acc += tl.load(base + b[:, None] * SUMS + cols[None, :], mask=(b < BLOCKS)[:, None], other=0.0)
    sums = tl.sum(acc, axis=0)
    s_q, s_sq, s_swo, s_w2 = _pick(sums, 0), _pick(sums, 1), _pick(sums, 2), _pick(sums, 3)
    normuon_eps = tl.load(Eps)
    hyperball_eps = tl.load(Eps + 1)
    # fp64: sqrt and / are IEEE round-to-nearest (sqrt.rn.f64, div.rn.f64; the _rn forms are fp32-only)
    ratio = tl.full([], 1.0, dtype=tl.float64)
    if NORMUON:
        ratio = tl.sqrt(s_q) / (tl.sqrt(s_sq) + normuon_eps)
    if HYPERBALL:
        radius = tl.load(Radius + k).to(tl.float64)
        g = ratio * radius / tl.maximum(ratio * tl.sqrt(s_sq), hyperball_eps, propagate_nan=tl.PropagateNan.ALL)
        ag = tl.load(Alphas + k).to(tl.float64) * g
        norm = tl.sqrt(tl.maximum(s_w2 + 2.0 * ag * s_swo + ag * ag * s_sq, 0.0, propagate_nan=tl.PropagateNan.ALL))
        # a step that moves nothing leaves W exactly as it is (variants.gains)
        shrink = tl.where(ag == 0.0, 1.0, radius / tl.maximum(norm, hyperball_eps, propagate_nan=tl.PropagateNan.ALL))
        tl.store(Gains + k, g.to(tl.float32))
        tl.store(Shrink + k, shrink.to(tl.float32))
    else:
        tl.store(Gains + k, ratio.to(tl.float32))


@functools.cache
def _eps_pair(normuon_eps: float, hyperball_eps: float, device: torch.device) -> torch.Tensor:
    """The two epsilons as fp64 device values (a float argument would reach the kernel as fp32), made
    once: a CUDA-graph capture may not copy from the host."""
    return torch.tensor([normuon_eps, hyperball_eps], dtype=torch.float64, device=device)


def variant_factors(partials: torch.Tensor, alphas: torch.Tensor | None, radius: torch.Tensor | None, *,
                    normuon: bool, hyperball: bool, normuon_eps: float,
                    hyperball_eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(g, c or None) per matrix, fp32 (K,), from the (K, blocks, 4) partial sums; ``alphas`` and
    ``radius``: per matrix (K,) fp32, for the hyperball."""
    k, nb, _ = partials.shape
    gains = torch.empty(k, dtype=torch.float32, device=partials.device)
    shrink = torch.empty(k, dtype=torch.float32, device=partials.device) if hyperball else None
    if k == 0:
        return gains, shrink
    launch(_variant_factors_kernel, (checked_grid(k, "variant_factors"),),
        partials, alphas if hyperball else gains, radius if hyperball else gains,
        _eps_pair(float(normuon_eps), float(hyperball_eps), partials.device), gains,
        shrink if hyperball else gains, nb, NORMUON=normuon, HYPERBALL=hyperball,
        CHUNK=min(64, triton.next_power_of_2(nb)), enable_fp_fusion=fp_fusion(_variant_factors_kernel),
    )
    return gains, shrink
