"""Every Triton kernel, AOT-compiled for sm_80…sm_90 without a GPU: tensor cores, shared memory, spills."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import sass_report  # noqa: E402
from muon_kernels.triton_kernels.config import PERSISTENT_MIN_ARCH, SHARED_MEMORY_LIMIT, all_configs  # noqa: E402


def test_required_archs_are_targeted():
    for arch in sass_report.REQUIRED_ARCHS:
        assert sass_report.targets(arch), f"this Triton cannot compile for sm_{arch}"


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMIT))
def test_kernels_compile_use_tensor_cores_fit_and_do_not_spill(arch):
    if arch not in sass_report.REQUIRED_ARCHS and not sass_report.targets(arch):
        pytest.skip(f"the installed Triton does not target sm_{arch}")  # the issue: "where it targets them"
    rows = sass_report.report(arch)
    names = {r.name for r in rows}
    persistent = {"symmetric_matmul[persistent, split X·Xᵀ]", "symmetric_matmul[persistent, split b·R+c·R·R+a·I]",
                  "symmetric_matmul[persistent X·Xᵀ]", "symmetric_matmul[persistent b·A+c·A·A]",
                  "symmetric_matmul[persistent b·R+c·R·R+a·I]", "ns_update[persistent a·X+B·X]"}
    assert names == (persistent if arch >= PERSISTENT_MIN_ARCH else set()) | {
                     "symmetric_matmul[X·Xᵀ]", "symmetric_matmul[b·A+c·A·A]",
                     "symmetric_matmul[b·R+c·R·R+a·I]", "symmetric_matmul[split X·Xᵀ]",
                     "symmetric_matmul[split b·R+c·R·R+a·I]",
                     "ns_update[a·X+B·X]", "normalize[sum_squares]", "normalize[scale_cast]",
                     "fused_momentum[ema]", "fused_momentum[sgd]",
                     "fused_momentum[ema, bf16-stochastic]", "fused_momentum[sgd, bf16-stochastic]",
                     "fused_momentum[ema, int8]", "fused_momentum[sgd, int8]",
                     "fused_apply_update", "fused_apply_update[cautious]", "fused_apply_update[normuon+hyperball]",
                     "fused_momentum[ema, int64 index]", "fused_apply_update[int64 index]",
                     "fused_apply_update[cautious][int64 index]", "fused_apply_update[normuon+hyperball][int64 index]",
                     "fused_momentum[ema, vector]", "fused_momentum[sgd, vector]", "fused_apply_update[vector]",
                     "fused_apply_update[cautious][vector]", "fused_apply_update[normuon+hyperball][vector]",
                     "variant_statistics", "variant_factors", "small_newton_schulz"}
    # Every config the table, autotuning or bench/tune.py can pick is compiled, split kernel included.
    labels = {r.config.rsplit(":", 2)[0] for r in rows if r.is_matmul and r.name != "small_newton_schulz"}
    assert labels == set(all_configs(arch))
    for r in rows:
        where = f"{r.name} {r.dtype} {r.config} on sm_{arch}"
        assert r.spills == 0, f"{where} spills {r.spills} bytes"
        assert r.shared_bytes <= SHARED_MEMORY_LIMIT[arch], f"{where} needs {r.shared_bytes} B of shared memory"
        if r.expects_tensor_cores:
            assert r.tensor_core_instructions > 0, f"{where} emitted no tensor-core instructions"
        if r.is_matmul and r.config.endswith(":ieee"):
            assert r.tensor_core_instructions == 0, f"{where}: ieee fp32 must not run on tensor cores"
        # Descriptor loads exactly where a config asks for them (only Hopper's table has TMA).
        if "+tma" in r.config:
            assert arch >= 90 and r.tma_instructions > 0, f"{where}: no UTMALDG"
        else:
            assert r.tma_instructions == 0, f"{where}: UTMALDG without a TMA config"
    # The elementwise kernels' per-element index arithmetic is 32-bit below 2^31 elements: none of the
    # int64 division routine's calls (~180 instructions each, per element) of the int64 fallback in a
    # memory-bound loop; the plain momentum and update kernels call nothing at all. (Other calls are
    # fp32 division's slow path: div_rn in int8 momentum and the variants.)
    by_case = {(r.name, r.dtype): r for r in rows}
    twins = [(by_case[(r.name.replace(", int64 index]", "]").replace("[int64 index]", ""), r.dtype)], r)
             for r in rows if "int64 index" in r.name]
    assert len(twins) == 4
    for narrow, wide in twins:
        assert narrow.calls < wide.calls, f"{narrow.name} {narrow.dtype} on sm_{arch}: {narrow.calls} calls"
        if narrow.name in ("fused_momentum[ema]", "fused_apply_update"):
            assert narrow.calls == 0, f"{narrow.name} {narrow.dtype} on sm_{arch} calls a routine"
    # The 16-byte path (ALIGNED): gradients, buffers, parameters and wide tensors' stack slices move
    # in 16-byte vectors, where the per-element path has none; the plain kernels also shrink (static
    # counts, both of the vector path's branches included).
    vectors = [(by_case[(r.name.replace(", vector]", "]").replace("[vector]", ""), r.dtype)], r)
               for r in rows if "vector" in r.name]
    assert len(vectors) == 4 * 2 + 3 * 2 * 3  # momentum: 4 dtype pairs × ema/sgd; update: 3 × 2 dtypes × 3 kinds
    for scalar, vector in vectors:
        where = f"{vector.name} {vector.dtype} on sm_{arch}"
        assert scalar.vector_accesses == 0 and vector.vector_accesses >= 2, where
        if "normuon" not in vector.name:
            assert vector.instructions < scalar.instructions, (where, vector.instructions, scalar.instructions)
    # The statistics pass reads the orthogonalized stack in 16-byte vectors in each of its four
    # loops (neurons on the stack's rows or columns × the parameter transposed or not), where the
    # per-element orientation it had before gave none.
    statistics = [r for r in rows if r.name == "variant_statistics"]
    assert statistics and all(r.vector_accesses >= 4 for r in statistics), \
        [(r.dtype, r.vector_accesses) for r in statistics]
    # Hopper runs the 16-bit products on warpgroup MMA, Blackwell (sm_100) on tcgen05.
    if arch in (90, 100):
        assert all(r.tensor_core_instructions > 0 for r in rows if r.is_matmul and r.dtype in ("bf16", "fp16"))
    if arch == 90:  # HMMA (mma.sync) would also count above: every 16-bit product must be on HGMMA (wgmma)
        products = [r for r in rows
                    if r.is_matmul and r.dtype in ("bf16", "fp16") and r.name != "small_newton_schulz"]
        assert products and all(r.warpgroup_mma_instructions > 0 for r in products), \
            [(r.name, r.dtype, r.config) for r in products if not r.warpgroup_mma_instructions]
        tma = [r for r in products if "+tma" in r.config]  # bench/tune.py's TMA candidates
        assert tma and all(r.tma_instructions > 0 for r in tma)


def test_sass_report_cli_prints_json_rows():
    # The CLI's schema on a few kernels (the whole report runs in the test above).
    run = subprocess.run([sys.executable, "sass_report.py", "--arch", "90", "--json", "--names", "split b·R",
                          "scale_cast"], cwd=BENCH, capture_output=True, text=True, timeout=900, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert rows and {r["name"] for r in rows} == {"symmetric_matmul[split b·R+c·R·R+a·I]",
                                                "symmetric_matmul[persistent, split b·R+c·R·R+a·I]",
                                                "normalize[scale_cast]"}
    for row in rows:
        assert {"name", "arch", "dtype", "config", "is_matmul", "tensor_core_instructions",
                "warpgroup_mma_instructions", "tma_instructions", "shared_bytes",
                "registers", "spills"} <= set(row)


@pytest.mark.parametrize("arch", [80, 90])
def test_one_raw_disassembly_splits_into_each_kernels_own(arch):
    """sass_report.disassemble decodes many kernels' code in one nvdisasm call (raw mode) and splits it
    by offset; each kernel's instructions must be those nvdisasm prints from that kernel's own ELF."""
    import tempfile

    names = ("normalize[scale_cast]", "fused_momentum[ema, int8]", "symmetric_matmul[X·Xᵀ]")
    cases = [next(c for c in sass_report.kernel_cases(arch) if c[0] == name) for name in names]
    cubins = [sass_report.compile_kernel(fn, args, consts, arch, warps, stages).asm["cubin"]
              for _, fn, args, consts, _, _, warps, stages, _, _ in cases]

    def opcodes(sass: str) -> list[str]:  # the instruction (predicate, opcode and modifiers), not operands
        return [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+((?:@!?U?P\w+\s+)?[A-Z][\w.]*)", sass)]

    split = sass_report.disassemble(cubins, arch)
    assert len(split) == len(cubins)
    with tempfile.TemporaryDirectory() as tmp:
        for name, cubin, sass in zip(names, cubins, split):
            path = Path(tmp, "k.cubin")
            path.write_bytes(cubin)
            own = subprocess.run([str(sass_report.TRITON_BIN / "nvdisasm"), "-c", "-ndf", str(path)],
                                 capture_output=True, text=True, check=True).stdout
            assert opcodes(sass) == opcodes(own) and len(opcodes(own)) > 50, name


# A 65536×32768 view: every stride and size fits int32, so Triton passes them as i32, and inside
# one matrix row × stride reaches 2^31. The matmul kernels must form those products in int64.
_HUGE = dict(M=65536, K=32768, N=32768)


def _ttir(fn, args, consts):
    return sass_report.compile_kernel(fn, args, consts, 90, 8, 3).asm["ttir"]


def test_matmul_offsets_are_int64_for_a_65536x32768_view():
    from muon_kernels.triton_kernels.newton_schulz import _ns_update_kernel
    from muon_kernels.triton_kernels.symmetric_matmul import _symmetric_matmul_kernel

    m, k = _HUGE["M"], _HUGE["K"]
    common = dict(UPCAST=False, PRECISION="tf32")
    symmetric = _ttir(_symmetric_matmul_kernel,
                      dict(X="bf16", Y="bf16", D="bf16", C="bf16", Partial="fp32", Counter="i32", X_desc=None,
                           Y_desc=None, M=m, K=k,
                           items=4096, splits=1, k_per_split=k,
                           stride_xb=m * k, stride_xm=k, stride_xk=1, stride_yb=m * k, stride_ym=k, stride_yk=1,
                           stride_db=m * m, stride_dm=m, stride_dn=1, stride_cb=m * m, stride_cm=m, stride_cn=1,
                           alpha=1.0, beta=0.0, shift=0.0),
                      dict(HAS_D=True, HAS_SHIFT=True, SPLIT=False, BLOCK=128, BLOCK_K=64, TMA=False, PERSISTENT=False,
                           ROWS=16, **common))
    update = _ttir(_ns_update_kernel,
                   dict(B="bf16", X="bf16", Out="bf16", B_desc=None, X_desc=None, M=m, N=k, items=4096,
                        stride_bb=m * m, stride_bm=m, stride_bk=1, stride_xb=m * k, stride_xm=k, stride_xn=1,
                        stride_ob=m * k, stride_om=k, stride_on=1, a=1.0),
                   dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, TMA=False, PERSISTENT=False,
                        **common))
    for name, ttir in (("symmetric_matmul", symmetric), ("ns_update", update)):
        # An index × stride product on an i32 tensor would wrap past 2^31 elements.
        i32_products = re.findall(r"arith\.muli [^\n]*: tensor<[0-9x]+xi32>", ttir)
        assert not i32_products, f"{name}: {i32_products[:3]}"
        assert re.search(r"arith\.muli [^\n]*: tensor<[0-9x]+xi64>", ttir), f"{name}: no int64 index products"


def test_kernels_without_contraction_round_as_written():
    """The kernels registered by ``config.rounds_as_written`` (fused momentum and update, the variant
    factors), in every variant the SASS report compiles: no contractible multiply or add in their PTX
    (every fp32/fp64 multiply and add keeps its own rounding, ``.rn``), and an FMA only where the code
    asks for one (``_fma``: SGD's Nesterov blend g + μ·M and add_'s W + α·O, as torch computes them;
    lerp). With contraction, ptxas fused the SGD buffer's μ·M + G (torch.optim.SGD: mul_ then add_,
    two roundings) into one FMA on sm_90, which the CPU interpreter cannot show."""
    from muon_kernels.triton_kernels import config

    cases = [c for c in sass_report.kernel_cases(90) if not config.fp_fusion(c[1])]
    assert {c[1].__name__ for c in cases} == {"_fused_momentum_kernel", "_fused_apply_update_kernel",
                                              "_variant_factors_kernel"}
    for name, fn, args, consts, _, dtype, warps, stages, _, _ in cases:
        ptx = sass_report.compile_kernel(fn, args, consts, 90, warps, stages).asm["ptx"]
        assert not re.search(r"\b(?:mul|add|sub)\.f(?:32|64)\b", ptx), (name, dtype)  # none contractible
        if name.startswith(("fused_momentum[sgd", "fused_apply_update")):
            assert "mul.rn.f32" in ptx and "fma.rn.f32" in ptx, (name, dtype)


@pytest.mark.parametrize("arch", [80, 90])
def test_split_fixups_publish_their_partials_before_arriving(arch):
    """The kernels whose programs meet at an arrival counter (split X·Xᵀ and b·R+c·R·R+a·I, the
    normalization's sum of squares): every thread's partial stores, then a CTA barrier, then one
    gpu-scope acquire-release atomic; the last to arrive reads the partials only after a barrier that
    shares the atomic's result, and through L2 (``.cg``: not a stale L1 line). The CPU interpreter,
    running programs one at a time, cannot show a missing fence; this reads the PTX a GPU runs."""
    names = set()
    for name, fn, args, consts, _, dtype, warps, stages, _, _ in sass_report.kernel_cases(arch):
        if "split" not in name and name != "normalize[sum_squares]":
            continue
        names.add(name)
        lines = sass_report.compile_kernel(fn, args, consts, arch, warps, stages).asm["ptx"].splitlines()
        atoms = [i for i, line in enumerate(lines) if re.search(r"\batom\.", line)]
        assert len(atoms) == 1 and re.search(r"atom\.global\.gpu\.acq_rel\.add", lines[atoms[0]]), (name, dtype)
        arrive = atoms[0]
        last_store = max(i for i in range(arrive) if "st.global" in lines[i])
        assert any("bar.sync" in line for line in lines[last_store:arrive]), f"{name} {dtype}: no barrier before arriving"
        reads = [i for i in range(arrive, len(lines)) if "ld.global.cg" in lines[i]]
        assert reads and any("bar.sync" in line for line in lines[arrive:reads[0]]), f"{name} {dtype}: partial reads"
    assert {"symmetric_matmul[split X·Xᵀ]", "symmetric_matmul[split b·R+c·R·R+a·I]", "normalize[sum_squares]"} <= names


def test_normalization_divides_and_takes_square_roots_round_to_nearest():
    """The per-matrix reduction's square root (sum-of-squares launch) and the per-element division
    (scale-and-cast launch) compile to the round-to-nearest instructions, as torch computes them."""
    from muon_kernels.triton_kernels.newton_schulz import _scale_cast_kernel, _sum_squares_kernel

    r, c = 1024, 4096
    tiles_c = c // 256
    shape = dict(R=r, C=c, tiles_c=tiles_c, tiles=(r // 64) * tiles_c, stride_gb=r * c, stride_gr=c, stride_gc=1)
    reduce_ptx = sass_report.compile_kernel(
        _sum_squares_kernel,
        dict(G="fp32", Partial="fp32", Norm="fp32", Counter="i32", **shape, norm_scale=1.0, norm_offset=0.0,
             floor=1e-7),
        dict(BLOCK_R=64, BLOCK_C=256, BLOCK_P=1024), 90, 4, 1).asm["ptx"]
    scale_ptx = sass_report.compile_kernel(
        _scale_cast_kernel, dict(G="fp32", Norm="fp32", Out="bf16", **shape),
        dict(BLOCK_R=64, BLOCK_C=256), 90, 4, 1).asm["ptx"]
    assert "sqrt.rn.f32" in reduce_ptx and "div.rn.f32" in scale_ptx
    for ptx in (reduce_ptx, scale_ptx):
        assert not re.search(r"sqrt\.approx|div\.full|div\.approx|rcp\.approx", ptx)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("m, n", [(1, 4096), (1, 1), (16, 1), (1024, 4096)])
def test_statistics_kernel_compiles_for_single_row_and_column_stacks(arch, m, n):
    """On a GPU Triton turns an int argument equal to 1 into a constant (a Python int in the kernel
    body): the statistics pass must compile for a 1×n or n×1 stack (a 1-output conv, a Linear(d, 1)
    in a NorMuon group), which the interpreter, specializing nothing, cannot show."""
    import triton.language as tl

    from muon_kernels.triton_kernels import variant_statistics as vs

    args = dict(Ortho="bf16", Table="i64", RowScale="fp32", Partials="fp32", M=m, N=n, BLOCKS=128, weight=0.05,
                eps=1e-10)
    consts = dict(PARAM_DTYPE=tl.float32, NORMUON=True, HYPERBALL=True, BLOCK_N=vs.BLOCK_N, BLOCK_J=vs.BLOCK_J,
                  EMULATE_RN=False)
    kernel = sass_report.compile_kernel(vs._variant_statistics_kernel, args, consts, arch, 4, 1)
    assert "ld.global" in kernel.asm["ptx"]
