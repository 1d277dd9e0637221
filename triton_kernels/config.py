"""Launch configurations: one table per arch family, chosen by a fixed heuristic.

Configs are deterministic by design: a fixed (arch, dtype, size) → config rule means a run resumed
in a new process computes bit-identical results, which an autotuner picking a different BLOCK_K
(a different accumulation order) would not guarantee.

Why these sizes: 128×128 fp32 accumulators need 8 warps (with 4 warps they take 255 registers per
thread and spill); BLOCK_K=64 at 16 bits gives 32 KB of operand tiles per pipeline stage, so three
stages fit sm_80/sm_90 shared memory (163/227 KB) and two fit sm_86/sm_89 (99 KB). fp32 "ieee" runs on
FFMA, not tensor cores: 64×64 tiles with BLOCK_K=16 are the largest that do not spill on any of
sm_80…sm_90 (BLOCK_K=32 spills 8–16 bytes on sm_86/89/90; checked with bench/sass_report.py).
Matrices with fewer than 128 rows take 64-wide tiles so that the grid still has work for the SMs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# Pinned rather than left to the Triton default, which flips from fused to unfused multiply-adds in
# Triton 3.10: results must not change with the installed Triton version.
FP_FUSION = True

# Per-block shared-memory limits (bytes) by compute capability (DESIGN.md §5).
# sm_100 (B200) has Hopper's 227 KB, sm_120 (RTX 50xx) the 99 KB of sm_86/89.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                       120: 99 * 1024}
ARCHS = tuple(SHARED_MEMORY_LIMIT)
_DEEP = (80, 90, 100)  # room for three pipeline stages of 128×128×64 16-bit tiles and the epilogue

_LARGE_16 = {arch: MatmulConfig(128, 128, 64, 8, 3 if arch in _DEEP else 2) for arch in ARCHS}
# sm_100: 8 warps; with 4, Triton 3.6's a·X + B·X (int64 tile offsets) spills 8 bytes at 72 registers.
_SMALL_16 = {arch: MatmulConfig(64, 64, 64, 8 if arch == 100 else 4, 3 if arch in _DEEP else 2) for arch in ARCHS}
# On sm_100/sm_120 the tf32 a·X + B·X kernel spills at 4 warps (8–16 bytes, Triton 3.6 and 3.9); 8 warps do not.
# On sm_120 the ieee X·Xᵀ kernel with int64 row offsets spills 8 bytes with two stages; one does not.
_FP32 = {arch: MatmulConfig(64, 64, 16, 8 if arch >= 100 else 4, 1 if arch == 120 else 2) for arch in ARCHS}
# The interpreter runs programs one at a time on the CPU: small tiles exercise the multi-tile,
# masked and mirrored paths on the small shapes the tests can afford.
INTERPRETER_CONFIG = MatmulConfig(32, 32, 32, 4, 1, group_m=2)


# CUDA's grid limits: axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65,535. Every launcher folds
# its batch into axis 0, so only axis 0 can grow with the input; the interpreter enforces neither.
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535


def checked_grid(programs: int, kernel: str, axis: int = 0) -> int:
    """``programs`` for grid ``axis``, or a clear error before a launch CUDA would refuse."""
    limit = GRID_X_MAX if axis == 0 else GRID_YZ_MAX
    if programs > limit:
        raise ValueError(f"{kernel}: {programs} programs exceed CUDA's grid limit of {limit} on axis {axis}; "
                         "lower max_workspace_bytes so the bucket runs in chunks")
    return programs


def is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_for(x: torch.Tensor) -> bool:
    """Under the CPU interpreter tl.dot on bf16 multiplies raw bit patterns: upcast 16-bit operands."""
    return is_interpreting() and x.dtype in (torch.bfloat16, torch.float16)


def precision_for(dtype: torch.dtype, fp32_precision: str) -> str:
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    return fp32_precision if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def arch_of(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    cc = 10 * major + minor
    # Newer archs than the table knows take the closest older entry.
    return max((a for a in ARCHS if a <= cc), default=ARCHS[0])


def matmul_config(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, arch: int | None = None) -> MatmulConfig:
    """The config for an (m×k)·(k×n) product in ``dtype`` on ``device`` (or for ``arch`` when given)."""
    if arch is None:
        if is_interpreting() or device.type != "cuda":
            return INTERPRETER_CONFIG
        arch = arch_of(device.index if device.index is not None else torch.cuda.current_device())
    if dtype == torch.float32:
        return _FP32[arch]
    return (_LARGE_16 if min(m, n) >= 128 else _SMALL_16)[arch]


# Opt-in autotuning (autotune.py) chooses among these and the table's own configs; see there why.
_EXTRA_16 = [(128, 128, 32, 8), (128, 64, 64, 4), (64, 128, 64, 4)]
_EXTRA_32 = [(32, 64, 16, 4), (64, 32, 16, 4)]


def _shared_bytes(cfg: MatmulConfig, itemsize: int) -> int:
    return cfg.num_stages * (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize


def tuning_space(arch: int, dtype: torch.dtype, kind: str | None = None) -> list[MatmulConfig]:
    """The configs autotuning may choose among on ``arch`` (``kind`` "symmetric": square tiles only)."""
    if dtype == torch.float32:
        base, extra, stages, itemsize = [_FP32[arch]], _EXTRA_32, 2, 4
    else:
        base, extra, stages, itemsize = [_LARGE_16[arch], _SMALL_16[arch]], _EXTRA_16, 3 if arch in _DEEP else 2, 2
    space = base + [MatmulConfig(bm, bn, bk, w, stages) for bm, bn, bk, w in extra]
    space = [c for c in dict.fromkeys(space) if _shared_bytes(c, itemsize) <= SHARED_MEMORY_LIMIT[arch]]
    return [c for c in space if kind != "symmetric" or c.block_m == c.block_n]


def all_configs(arch: int) -> dict[str, MatmulConfig]:
    """Every distinct config the heuristic or autotuning can pick on ``arch`` (for AOT compile
    checks); labels starting with "fp32" or "tune32" are fp32 configs, the rest 16-bit."""
    configs = {"large16": _LARGE_16[arch], "small16": _SMALL_16[arch], "fp32": _FP32[arch]}
    for bits, dtype in (("16", torch.bfloat16), ("32", torch.float32)):
        for c in tuning_space(arch, dtype):
            if c not in configs.values():
                configs[f"tune{bits}:{c.block_m}x{c.block_n}x{c.block_k}"] = c
    return configs
