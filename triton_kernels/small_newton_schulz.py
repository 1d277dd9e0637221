"""The whole Newton–Schulz iteration in one kernel for matrices that fit in one CTA.

For small matrices the multi-kernel path is bound by launches (3 per step) and by round trips of
X, A and B through global memory. Here one program owns one matrix: X stays in registers/shared
memory for every step, and each step's A = X·Xᵀ, B = b·A + c·A·A and X = a·X + B·X are rounded to
the iteration dtype exactly where the multi-kernel path stores them, so both paths compute the
same recurrence. Whether a matrix fits is a byte budget per arch, not a side length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import workspace
from ..ns_config import NSConfig
from .config import FP_FUSION, arch_of, checked_grid, is_interpreting, precision_for, upcast_for
from .newton_schulz import normalize
from .launch import launch

# Bytes of one padded matrix (BLOCK_M × BLOCK_N in the iteration dtype) that one program may hold:
# X, the fp32 accumulators and the dot operands staged in shared memory must fit beside it.
SMALL_BYTES = {80: 32 * 1024, 86: 16 * 1024, 89: 16 * 1024, 90: 32 * 1024, 100: 32 * 1024, 120: 16 * 1024}
_MIN_BLOCK = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _small_newton_schulz_kernel(
    X, Out, Coefficients,
    M, N, steps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = batch * M * N + rows[:, None] * N + cols[None, :]
    dtype = X.dtype.element_ty
    # Padding is zeros, and zero rows/columns stay zero through every step.
    x = tl.load(X + offsets, mask=mask, other=0.0)
    for s in range(steps):
        a = tl.load(Coefficients + 3 * s)
        b = tl.load(Coefficients + 3 * s + 1)
        c = tl.load(Coefficients + 3 * s + 2)
        xo = x.to(tl.float32) if UPCAST else x
        gram = tl.dot(xo, tl.trans(xo), input_precision=PRECISION).to(dtype)
        go = gram.to(tl.float32) if UPCAST else gram
        poly = (b * gram.to(tl.float32) + c * tl.dot(go, go, input_precision=PRECISION)).to(dtype)
        po = poly.to(tl.float32) if UPCAST else poly
        x = (a * x.to(tl.float32) + tl.dot(po, xo, input_precision=PRECISION)).to(dtype)
    tl.store(Out + offsets, x, mask=mask)


def num_warps(block_m: int, block_n: int) -> int:
    """8 warps from 4096 elements up: with 4, a 32×128 fp32 tile spills on sm_86 (bench/sass_report.py)."""
    return 8 if block_m * block_n >= 32 * 128 else 4


def _blocks(m: int, n: int) -> tuple[int, int]:
    return max(_MIN_BLOCK, triton.next_power_of_2(m)), max(_MIN_BLOCK, triton.next_power_of_2(n))


def budget(ns_dtype: torch.dtype, arch: int) -> int:
    """fp32 iterates on FFMA with fp32 operands held in registers: half the budget keeps it from
    spilling (a 32×128 fp32 tile spills on sm_86/89)."""
    return SMALL_BYTES[arch] // (2 if ns_dtype == torch.float32 else 1)


def fits(m: int, n: int, ns_dtype: torch.dtype, arch: int) -> bool:
    """Whether an oriented m×n matrix (m <= n) takes the one-kernel path on ``arch``."""
    block_m, block_n = _blocks(m, n)
    return block_m * block_n * torch.finfo(ns_dtype).bits // 8 <= budget(ns_dtype, arch)


def fits_device(m: int, n: int, ns_dtype: torch.dtype, device: torch.device) -> bool:
    if is_interpreting() or device.type != "cuda":
        return fits(m, n, ns_dtype, max(SMALL_BYTES, key=SMALL_BYTES.get))
    return fits(m, n, ns_dtype, arch_of(device.index if device.index is not None else torch.cuda.current_device()))


# Device copies of coefficient tables, one per (device, coefficients): built on first use, so a
# steady-state step copies nothing from the host (a pageable copy per call would also break
# CUDA-graph capture). The key space is the presets and lists a program uses: a handful of entries.
_COEFFICIENT_TABLES: dict[tuple, torch.Tensor] = {}


def _coefficient_table(coefficients: tuple, device: torch.device) -> torch.Tensor:
    key = (device, coefficients)
    table = _COEFFICIENT_TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("muon_kernels: new Newton–Schulz coefficients during CUDA-graph capture; run one "
                               "eager opt.step() with the same settings before capturing")
        table = torch.tensor(coefficients, dtype=torch.float32).to(device)
        _COEFFICIENT_TABLES[key] = table
    return table


def small_newton_schulz(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype,
                        fp32_precision: str = "ieee") -> torch.Tensor:
    """Newton–Schulz on a (k, m, n) stack (m <= n) of small matrices: 2 normalization launches and
    one launch for all steps of all k matrices."""
    X = normalize(stack, config, ns_dtype)
    k, m, n = X.shape
    if config.steps == 0 or X.numel() == 0:
        return X
    coefficients = _coefficient_table(config.coefficients, X.device)
    out = workspace.empty_like(X)
    block_m, block_n = _blocks(m, n)
    launch(_small_newton_schulz_kernel, (checked_grid(k, "small_newton_schulz"),),
        X, out, coefficients, m, n, config.steps,
        BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=upcast_for(X), PRECISION=precision_for(ns_dtype, fp32_precision),
        num_warps=num_warps(block_m, block_n), enable_fp_fusion=FP_FUSION,
    )
    return out
