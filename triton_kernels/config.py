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

Hopper (sm_90) and the launch-shape choices — predictions until bench/tune.py has measured them on an
H100/H200 (the table's "why" below; bench/README.md "Kernel notes (Hopper)" has the numbers):

- TMA (``tma=True``, a bench/tune.py candidate on sm_90, not in the table until measured): operands
  arrive through host tensor descriptors (UTMALDG into swizzled shared
  memory) instead of per-element pointer tensors. The pointer main loop recomputes a 128×64 int64
  address tensor and a bounds mask per operand per iteration (~64 int64 adds per thread per step,
  and the registers that hold them beside a 64-register accumulator); TMA needs one descriptor and
  two coordinates. Predicted: 0–10% at 4096², more on the few-tile m×m products, if the loop was
  issue-bound. Its cost is host time: two descriptors built per launch (~4 µs each in Python) and
  encoded by Triton's launcher, which small products may not earn back in eager mode (tune.py's
  ``ms`` against ``ms_graph`` shows it). Only sm_90 has TMA in this table; pointer loads stay on
  sm_80/86/89 (cp.async, software pipelined). A launch falls back to pointer loads for any operand
  TMA cannot describe (a transposed view, rows not 16-byte aligned), with the same accumulation
  order, so the bits do not change.
- Four or five pipeline stages with TMA on sm_90 (4 × 32 KB of 128×128×64 16-bit tiles; tune.py
  candidates): TMA loads are issued by one thread and land asynchronously, so a deeper ring could
  hide HBM latency at no register cost.
- Split-K (symmetric products only; ``split_factor``): when a product has fewer output tiles than
  about two waves of the device's SMs, its K range is cut into S slices, each program writes an
  fp32 partial tile, and the last of a tile's S programs to finish (an integer arrival counter per
  tile) sums the partials in slice order and applies the epilogue in the same launch (a fixed
  order, no floating-point atomics: the same bits on every run; one launch, not two).
  ``a·X + B·X`` is not split: its K is m, at most a few dozen iterations, and it has
  (m/128)·(n/128) tiles — 144 at 768×3072, 256 at 1024×4096 — where the model below never pays
  for the reduction.
- Persistent grids (``persistent=True``): min(items, SMs) programs each loop over work items.
  Off by default: with no warp specialization the epilogue of one tile does not overlap the next
  tile's loads, so the gain is the launch's block scheduling only; bench/tune.py times it. Offered
  from sm_90 (``PERSISTENT_MIN_ARCH``): on sm_86/89 ptxas caps the 128×64 a·X + B·X kernel at 168
  registers (three blocks per SM) and the item loop's few extra values spill 8 bytes (Triton 3.6). Warp
  specialization itself is not offered: ``tl.range(..., warp_specialize=True)`` on either loop
  compiled for sm_90 (Triton 3.9) to the same registers and no ``setmaxnreg`` — it did not apply;
  on a minimal TMA-descriptor GEMM loop it fails to compile at 4 warps and does not apply at 8
  (bench/README, "Kernel notes (Hopper)").
"""

from __future__ import annotations

import contextlib
import functools
import json
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
    # 0: the split factor is chosen per launch (``split_factor``, from the device's SM count);
    # 1: never split; S > 1: always S slices. Only the symmetric kernel splits.
    split_k: int = 0
    tma: bool = False  # operands through host TMA descriptors (sm_90+), where the operand allows it
    persistent: bool = False  # min(items, SMs) programs looping over the work items

    def label(self) -> str:
        """A short stable name, e.g. ``128x128x64w8s4+tma+persistent+split3``."""
        extra = "+tma" * self.tma + "+persistent" * self.persistent + (f"+split{self.split_k}" if self.split_k else "")
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}{extra}"


# Pinned rather than left to the Triton default, which flips from fused to unfused multiply-adds in
# Triton 3.10: results must not change with the installed Triton version.
FP_FUSION = True
# Kernels compiled without multiply-add contraction (``rounds_as_written``; each says why beside its
# definition). One registry, read by every launcher and by bench/sass_report.py, so the compiled
# code the SASS report and the AOT tests read is the code a launch runs. By id, as launch.py keys its
# sites: hashing a JITFunction takes a lock (~0.4 µs a launch); the kernels are module globals.
_ROUNDED_AS_WRITTEN: set[int] = set()


def rounds_as_written(kernel):
    """Decorator above ``@triton.jit``: ``kernel`` launches with contraction off (``fp_fusion``)."""
    _ROUNDED_AS_WRITTEN.add(id(kernel))
    return kernel


def fp_fusion(kernel) -> bool:
    """The ``enable_fp_fusion`` every launch of ``kernel`` passes."""
    return FP_FUSION and id(kernel) not in _ROUNDED_AS_WRITTEN

# Per-block shared-memory limits (bytes) by compute capability (DESIGN.md §5).
# sm_100 (B200) has Hopper's 227 KB, sm_120 (RTX 50xx) the 99 KB of sm_86/89.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                       120: 99 * 1024}
ARCHS = tuple(SHARED_MEMORY_LIMIT)
_DEEP = (80, 90, 100)  # room for three pipeline stages of 128×128×64 16-bit tiles and the epilogue

# sm_90 keeps the pointer-load config the H200 measured (799 TFLOP/s-equivalent at 4096², 2026-12-04):
# TMA and a four-deep ring are bench/tune.py candidates, not defaults, until a GPU has timed them.
_LARGE_16 = {arch: MatmulConfig(128, 128, 64, 8, 3 if arch in _DEEP else 2) for arch in ARCHS}
# sm_100: 8 warps; with 4, Triton 3.6's a·X + B·X (int64 tile offsets) spills 8 bytes at 72 registers.
_SMALL_16 = {arch: MatmulConfig(64, 64, 64, 8 if arch == 100 else 4, 3 if arch in _DEEP else 2) for arch in ARCHS}
# On sm_100/sm_120 the tf32 a·X + B·X kernel spills at 4 warps (8–16 bytes, Triton 3.6 and 3.9); 8 warps do not.
# On sm_90 the ieee b·A + c·A·A kernel (upper-triangle and mirror masks in its epilogue) spills 8 bytes at
# 128 registers with 4 warps (Triton 3.9); 8 warps do not.
# On sm_120 the ieee X·Xᵀ kernel with int64 row offsets spills 8 bytes with two stages; one does not.
_FP32 = {arch: MatmulConfig(64, 64, 16, 8 if arch >= 90 else 4, 1 if arch == 120 else 2) for arch in ARCHS}
# The interpreter runs programs one at a time on the CPU: small tiles exercise the multi-tile,
# masked and mirrored paths on the small shapes the tests can afford.
INTERPRETER_CONFIG = MatmulConfig(32, 32, 32, 4, 1, group_m=2)


# CUDA's grid limits: axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65,535. Every launcher folds
# its batch into axis 0, so only axis 0 can grow with the input; the interpreter enforces neither.
GRID_X_MAX = 2**31 - 1
GRID_YZ_MAX = 65535


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for the launchers' host code: ``triton.cdiv`` is a constexpr function since Triton
    3.6 and costs ~1.6 µs per call on the host, several times per launch."""
    return -(-a // b)


def checked_grid(programs: int, kernel: str, axis: int = 0) -> int:
    """``programs`` for grid ``axis``, or a clear error before a launch CUDA would refuse."""
    limit = GRID_X_MAX if axis == 0 else GRID_YZ_MAX
    if programs > limit:
        raise ValueError(f"{kernel}: {programs} programs exceed CUDA's grid limit of {limit} on axis {axis}; "
                         "lower max_workspace_bytes so the bucket runs in chunks")
    return programs


# Read once: Triton itself decides at ``@triton.jit`` time (import) whether kernels are interpreted, so
# the flag cannot change for this process's kernels, and a launch path asks several times (a plain
# global rather than a cache, which torch.compile would warn about while tracing a launcher).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_interpreting() -> bool:
    return _INTERPRETING


def _interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar (a loop bound such as ``range(k_lo, k_hi, BLOCK_K)``)
    into an int with ``int(1-element array)``, which numpy >= 2.4 refuses; Triton 3.9 squeezes the
    array first. The same conversion, squeezed, on any Triton whose interpreter patches tensors this
    way: a machine with a newer numpy (the GPU machine's is not pinned) still runs the interpreter."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes_scalars", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_scalars = True
    interpreter._patch_lang_tensor = patched


if _INTERPRETING:
    _interpreter_scalar_index()


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


KINDS = ("symmetric", "ns_update")


def shape_class(m: int, n: int) -> str:
    """The size class of an m×n output a tuned config applies to: "small" (under 128 rows or
    columns: 64-wide tiles), "mid" (under 2048: few tiles, where split-K and launch overhead
    matter), "large" (many waves of tiles)."""
    side = min(m, n)
    return "small" if side < 128 else "mid" if side < 2048 else "large"


# Measured winners, (arch, dtype, kind, shape class) → config, pasted from ``bench/tune.py``'s
# printed rows after a GPU run (empty: nothing measured yet, the table below decides). A winners
# JSON named by MUON_KERNELS_TUNED_CONFIGS (bench/tune.py writes one) is read at import and takes
# precedence, so a tuning session can try its winners before committing them here.
TUNED: dict[tuple[int, str, str, str], MatmulConfig] = {}
TUNED_ENV = "MUON_KERNELS_TUNED_CONFIGS"


def config_from_dict(d: dict) -> MatmulConfig:
    return MatmulConfig(**{f: d[f] for f in MatmulConfig.__dataclass_fields__ if f in d})


def load_tuned(path: str | os.PathLike) -> dict[tuple[int, str, str, str], MatmulConfig]:
    """The ``winners`` of a bench/tune.py JSON: [{"arch", "dtype", "kind", "shape_class", "config"}]."""
    with open(path) as f:
        rows = json.load(f)["winners"]
    return {(int(r["arch"]), r["dtype"], r["kind"], r["shape_class"]): config_from_dict(r["config"]) for r in rows}


def _tuned() -> dict[tuple[int, str, str, str], MatmulConfig]:
    path = os.environ.get(TUNED_ENV)
    if not path:
        return TUNED
    try:
        return {**TUNED, **load_tuned(path)}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # set on purpose: refuse, never ignore
        raise ValueError(f"{TUNED_ENV}={path}: not a readable bench/tune.py JSON with a 'winners' list "
                         f"({exc!r}); point it at the JSON tune.py wrote, or unset it for the built-in table") from exc


_TUNED_NOW = _tuned()
# bench/tune.py's switch: the config every product of ``kind`` takes while ``forced`` is active.
_FORCED: dict[str, MatmulConfig] = {}


@contextlib.contextmanager
def forced(**by_kind: MatmulConfig):
    """Within the block, every ``symmetric`` / ``ns_update`` product takes the given config (on a
    GPU or the interpreter alike): how bench/tune.py times a config across a whole recurrence."""
    unknown = set(by_kind) - set(KINDS)
    if unknown:
        raise ValueError(f"forced: unknown kinds {sorted(unknown)}; known: {KINDS}")
    saved = dict(_FORCED)
    _FORCED.update(by_kind)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def forcing() -> bool:
    """Whether ``forced`` is active (every product then takes a config chosen outside the table)."""
    return bool(_FORCED)


def matmul_config(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, arch: int | None = None,
                  kind: str | None = None) -> MatmulConfig:
    """The config for an (m×k)·(k×n) product in ``dtype`` on ``device`` (or for ``arch`` when given):
    a measured winner for (arch, dtype, ``kind``, shape class) where there is one, else the table."""
    if kind in _FORCED:
        return _FORCED[kind]
    if arch is None:
        if is_interpreting() or device.type != "cuda":
            return INTERPRETER_CONFIG
        arch = arch_of(device.index if device.index is not None else torch.cuda.current_device())
    tuned = _TUNED_NOW.get((arch, str(dtype).removeprefix("torch."), kind, shape_class(m, n)))
    if tuned is not None:
        return tuned
    if dtype == torch.float32:
        return _FP32[arch]
    return (_LARGE_16 if min(m, n) >= 128 else _SMALL_16)[arch]


# The interpreter's pretend SM count: small, so that the tests' small shapes (a few tiles) take the
# split-K path the way a 1024-row product does on a 132-SM H200.
INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=None)
def _device_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, read from the device once (never a table)."""
    if is_interpreting() or device.type != "cuda":
        return INTERPRETER_SMS
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


# Split-K cost model, in units of one main-loop iteration of one program (a BLOCK×BLOCK×BLOCK_K
# product: 2·128·128·64 FLOPs, 0.35 µs at an H200's 802 TFLOP/s / 132 SMs). Predictions until
# bench/tune.py measures split factors against each other:
# - SPLIT_FILL: a program's pipeline prologue and epilogue (three to four stages to fill, the tile
#   converted and stored);
# - SPLIT_PARTIAL: writing, or reading back, one fp32 partial tile (64 KB at 128×128; the partials
#   of a product that needs splitting are a few MB and stay in the 50 MB L2);
# - SPLIT_LAUNCH: the reduction's fixed cost (~3 µs, once a second launch and its drain). Both
#   backends (the CUDA one shares this rule) now reduce in the same launch, where it stands for the
#   arrival counter's round trip and the tail of the last slice's serial fixup (one program per
#   tile reads all S partials). Not refit for that yet: bench/tune.py's split rows (factors 1…8
#   side by side) decide.
SPLIT_FILL = 5
SPLIT_PARTIAL = 3
SPLIT_LAUNCH = 9
MAX_SPLIT = 16
MIN_SPLIT_ITERATIONS = 4  # a slice shorter than this never fills its pipeline
SPLIT_TILE_WAVES = 2  # only products with fewer tiles than this many waves of SMs are split


def split_cost(tiles: int, iterations: int, sms: int, splits: int) -> float:
    """Predicted time of a ``tiles``-tile product of ``iterations`` K steps cut into ``splits`` slices."""
    waves = -(-tiles * splits // sms)
    per_program = -(-iterations // splits) + SPLIT_FILL
    if splits == 1:
        return waves * per_program
    reduction = SPLIT_LAUNCH + -(-tiles // sms) * splits * SPLIT_PARTIAL
    return waves * (per_program + SPLIT_PARTIAL) + reduction


@functools.lru_cache(maxsize=4096)  # on every symmetric product of a step (both backends): the search is ~10 µs
def split_factor(tiles: int, iterations: int, sms: int) -> int:
    """The K-split of a product with ``tiles`` output tiles and ``iterations`` BLOCK_K steps on a
    device with ``sms`` SMs: the cheapest under ``split_cost`` (ties: fewer slices), 1 once the
    tiles fill ``SPLIT_TILE_WAVES`` waves. A fixed rule, so the same device computes the same bits
    for the same launch; ``tiles`` counts the whole batch, so a matrix in a bucket of another size, or
    on a GPU with another SM count, may split otherwise and round otherwise (README, "Bit
    reproducibility")."""
    if tiles <= 0 or tiles >= SPLIT_TILE_WAVES * sms:
        return 1
    candidates = range(1, min(MAX_SPLIT, iterations // MIN_SPLIT_ITERATIONS) + 1)
    return min(candidates, key=lambda s: (split_cost(tiles, iterations, sms, s), s), default=1)


PERSISTENT_MIN_ARCH = 90  # persistent launches are tuned and AOT-checked from here (module docstring)


def persistent_programs(items: int, sms: int) -> int:
    """Programs of a persistent launch: one per SM (128×128 tiles with 8 warps and a 4-stage ring
    leave room for one program per SM on sm_90), never more than the items."""
    return max(1, min(items, sms))


# Opt-in autotuning (autotune.py) chooses among these and the table's own configs; see there why.
_EXTRA_16 = [(128, 128, 32, 8), (128, 64, 64, 4), (64, 128, 64, 4)]
# On sm_80, 64×128×64 a·X + B·X at 4 warps and three stages spills 8 bytes at 168 registers under
# Triton 3.7 (not 3.6, 3.8, 3.9); at 8 warps it spills under none. Elsewhere it keeps 4 warps (on
# Hopper one warpgroup: one m64n128 wgmma per K step).
_EXTRA_16_WARPS = {(80, 64, 128, 64): 8}
_EXTRA_32 = [(32, 64, 16, 4), (64, 32, 16, 4)]


def _shared_bytes(cfg: MatmulConfig, itemsize: int) -> int:
    return cfg.num_stages * (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * itemsize


def tuning_space(arch: int, dtype: torch.dtype, kind: str | None = None) -> list[MatmulConfig]:
    """The configs autotuning may choose among on ``arch`` (``kind`` "symmetric": square tiles only)."""
    if dtype == torch.float32:
        base, extra, stages, itemsize = [_FP32[arch]], _EXTRA_32, 2, 4
    else:
        base, extra, stages, itemsize = [_LARGE_16[arch], _SMALL_16[arch]], _EXTRA_16, 3 if arch in _DEEP else 2, 2
    space = base + [MatmulConfig(bm, bn, bk, _EXTRA_16_WARPS.get((arch, bm, bn, bk), w) if itemsize == 2 else w,
                                 stages) for bm, bn, bk, w in extra]
    space = [c for c in dict.fromkeys(space) if _shared_bytes(c, itemsize) <= SHARED_MEMORY_LIMIT[arch]]
    return [c for c in space if kind != "symmetric" or c.block_m == c.block_n]


# bench/tune.py's extra candidates on Hopper, (block_m, block_n, block_k, warps, stages, tma): TMA
# against pointer loads at the table's tile, three to five stages, the narrower K step, and a
# 128×256 tile for a·X + B·X (cuBLAS's Hopper shape: half the B panel reloads per FLOP).
_HOPPER_CANDIDATES_16 = [(128, 128, 64, 8, 3, False), (128, 128, 64, 8, 3, True), (128, 128, 64, 8, 5, True),
                         (128, 128, 32, 8, 4, True), (64, 64, 64, 4, 4, True), (128, 256, 64, 8, 3, True)]


def tuning_candidates(arch: int, dtype: torch.dtype, kind: str | None = None) -> list[MatmulConfig]:
    """What bench/tune.py times on ``arch``: the opt-in autotuning space, plus on sm_90 the TMA and
    pipeline-depth candidates. Split factors and persistence are launch choices on top (they do
    not change the compiled kernel, except the split kernel's partial store, which the AOT test
    compiles for every square config)."""
    space = tuning_space(arch, dtype)
    if arch == 90 and dtype != torch.float32:
        space += [MatmulConfig(bm, bn, bk, w, st, tma=tma) for bm, bn, bk, w, st, tma in _HOPPER_CANDIDATES_16]
    space = [c for c in dict.fromkeys(space) if _shared_bytes(c, dtype.itemsize) <= SHARED_MEMORY_LIMIT[arch]]
    return [c for c in space if kind != "symmetric" or c.block_m == c.block_n]


def all_configs(arch: int) -> dict[str, MatmulConfig]:
    """Every distinct config the heuristic, autotuning or bench/tune.py can pick on ``arch`` (for AOT
    compile checks); labels starting with "fp32" or "tune32" are fp32 configs, the rest 16-bit."""
    configs = {"large16": _LARGE_16[arch], "small16": _SMALL_16[arch], "fp32": _FP32[arch]}
    for bits, dtype in (("16", torch.bfloat16), ("32", torch.float32)):
        for c in tuning_candidates(arch, dtype):
            if c not in configs.values():
                configs[f"tune{bits}:{c.label()}"] = c
    return configs
