"""The CUDA C++ kernels without a GPU: what nvcc made of them (registers, spills, shared memory,
tensor-core instructions in the PTX, every kernel in every arch's SASS) and argument validation
that fires before anything could launch.

On this machine any CUDA call fails (no driver), so a ValueError from a bad call — rather than a
RuntimeError about the driver — shows the check ran before the first CUDA call.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from muon_kernels.backends import available_backends, select_backend
from muon_kernels.ns_config import NSConfig, KELLER

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
BUILT = NVCC is not None and os.environ.get("MUON_KERNELS_SKIP_CUDA_BUILD") != "1"
ARCHS = os.environ.get("MUON_KERNELS_CUDA_ARCHS", "75;80;86;89;90").split(";")
needs_build = pytest.mark.skipif(not BUILT, reason="nvcc is not on this machine, so _C was not built")

# Every kernel the extension must carry, by the name nvcc mangles into its symbol.
KERNELS = ("sum_squares_kernel", "norm_divisor_kernel", "scale_cast_kernel", "symmetric_matmul_kernel",
           "ns_update_kernel", "fused_momentum_kernel", "fused_apply_update_kernel", "variant_statistics_kernel",
           "low_precision_momentum_kernel")
MATMUL_KERNELS = ("symmetric_matmul_kernel", "ns_update_kernel")


def _cuobjdump() -> Path:
    local = Path(NVCC).parent / "cuobjdump"
    if local.is_file():
        return local
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _family(symbol: str) -> str | None:
    return next((k for k in KERNELS if k in symbol), None)


# ---- what the build contains ------------------------------------------------------------------

@needs_build
def test_every_kernel_is_compiled_for_every_arch_without_spills():
    from muon_kernels import _C

    listing = subprocess.run([str(_cuobjdump()), "-res-usage", _C.__file__], capture_output=True, text=True,
                             check=True).stdout
    # cuobjdump prints, per cubin, "arch = sm_XX" and per function "Function NAME:" then
    # "REG:n STACK:n SHARED:n LOCAL:n ...".
    found: dict[str, set[str]] = {}
    arch = None
    for line in listing.splitlines():
        if m := re.search(r"arch = sm_(\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            symbol = m.group(1)
        elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            family = _family(symbol)
            if family is None:
                continue
            found.setdefault(arch, set()).add(family)
            reg, stack, local = int(m.group(1)), int(m.group(2)), int(m.group(4))
            assert stack == 0 and local == 0, f"sm_{arch} {symbol}: STACK:{stack} LOCAL:{local} (spilled registers)"
            assert reg <= 255, f"sm_{arch} {symbol}: {reg} registers"
    assert set(found) == set(ARCHS)
    for arch, families in found.items():
        assert families == set(KERNELS), f"sm_{arch} lacks {set(KERNELS) - families}"


@needs_build
def test_sass_runs_16_bit_matmuls_on_tensor_cores_for_every_arch():
    """What the GPU executes: HMMA in every runnable 16-bit matmul kernel, FFMA (no HMMA) in the fp32
    ones; kernels an arch cannot run (bf16 or the sm80 path on sm_75) are trap stubs there."""
    from muon_kernels import _C

    sass = subprocess.run([str(_cuobjdump()), "-sass", _C.__file__], capture_output=True, text=True,
                          check=True).stdout
    checked: dict[str, int] = {}
    for section in re.split(r"\n(?=\s*arch = sm_)", sass):
        if not (m := re.search(r"arch = sm_(\d+)", section)):
            continue
        arch = m.group(1)
        for function in re.split(r"\n\s*Function : ", section)[1:]:
            name, body = function.split("\n", 1)
            if _family(name) not in MATMUL_KERNELS:
                continue
            operand = _operand(name)
            stub = arch == "75" and (operand == "bf16" or (operand == "fp16" and "CodePathE80" in name))
            if stub:
                assert "HMMA" not in body and "BPT.TRAP" in body, f"sm_{arch} {name}"
            elif operand == "fp32":
                assert "HMMA" not in body and "FFMA" in body, f"sm_{arch} {name}"
            else:
                assert "HMMA.16816.F32" in body or "HMMA.1688.F32" in body, f"sm_{arch} {name}: no tensor cores"
                assert ("HMMA.16816.F32.BF16" in body) == (operand == "bf16"), f"sm_{arch} {name}"
                # Fragments come from shared memory by ldmatrix, never by generic loads (what WMMA's
                # load_matrix_sync compiled to, with MOVM transposes: 0.2–0.4× of cuBLAS on the H200).
                assert "LDSM.16.M88.4" in body, f"sm_{arch} {name}: no ldmatrix"
                assert not re.search(r"\bLD\.E|\bLD\b|\bMOVM\b", body), f"sm_{arch} {name}: generic loads or MOVM"
                # Pairs of outputs go out as one 32-bit store.
                assert re.search(r"\bSTG\.E(\.SYS)?\s", body), f"sm_{arch} {name}: no 32-bit stores"
            checked[arch] = checked.get(arch, 0) + 1
    assert checked == {arch: 10 for arch in ARCHS}


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory) -> str:
    """nvcc --resource-usage for the oldest, the cp.async and the newest default archs (one compile)."""
    out = tmp_path_factory.mktemp("ptxas") / "newton_schulz.o"
    archs = ("75", "80", "90")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    result = subprocess.run([NVCC, "-std=c++17", "-O3", "--resource-usage", *gencode, "-c",
                             str(CSRC / "newton_schulz.cu"), "-o", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@needs_build
def test_ptxas_reports_no_spills_and_bounded_shared_memory_for_the_matmul_kernels(ptxas_report):
    # ptxas prints, per entry: "Compiling entry function 'SYM' for 'sm_XX'", then
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers, ...".
    entries = re.findall(r"Compiling entry function '(\S+)' for 'sm_(\d+)'\n"
                         r".*?Function properties.*?\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads\n.*?Used (\d+) registers(.*?)\n", ptxas_report)
    matmuls = [e for e in entries if _family(e[0]) in MATMUL_KERNELS]
    # Per arch: fp32 + fp16 and bf16 instantiations of both kernels (trap stubs included on sm_75).
    assert {e[1] for e in matmuls} == {"75", "80", "90"}
    assert len(matmuls) == 3 * 10  # per arch: 4 symmetric and 6 update instantiations
    for symbol, arch, frame, spill_st, spill_ld, regs, rest in matmuls:
        assert (int(frame), int(spill_st), int(spill_ld)) == (0, 0, 0), f"sm_{arch} {symbol} spills"
        assert int(regs) <= 255
        if _operand(symbol) == "fp32":  # the SIMT kernels run two 256-thread blocks per SM: 128 registers
            assert int(regs) <= 128, f"sm_{arch} {symbol}: {regs} registers > 128"
        smem = re.search(r"(\d+) bytes smem", rest)
        # Dynamic shared memory (the pipeline stages) is not in this number, and nothing else may be:
        # the sm80 path's stages are exactly 48 KB, the most a launch may take without opting in
        # (newton_schulz.cu, allow_shared_memory), so one static byte would fail every 16-bit
        # launch on sm_80+; and two blocks of the sm75 path fill a Turing SM's 64 KB exactly.
        assert smem is None, f"sm_{arch} {symbol}: {smem.group(1)} bytes of static shared memory"


def test_inline_cp_async_asm_clobbers_memory():
    """Shared-memory accesses must not be reordered across cp.async / commit / wait by the compiler."""
    source = (CSRC / "common.cuh").read_text()
    statements = re.findall(r'asm volatile\((".*?)\);', source, flags=re.S)
    cp_async = [s for s in statements if "cp.async" in s]
    assert len(cp_async) == 3
    for statement in cp_async:
        assert statement.rstrip().endswith('"memory"'), statement


def _operand(name: str) -> str:
    """The operand type of a matmul kernel: its first template argument in the mangled name."""
    args = name.split("kernelI", 1)[1]
    return "bf16" if args.startswith("13__nv_bfloat16") else "fp16" if args.startswith("6__half") else "fp32"


def _ptx_entries(ptx: str) -> dict[str, str]:
    """.entry name → body, from a PTX file."""
    parts = re.split(r"(?:\.visible\s+)?\.entry\s+", ptx)[1:]
    return {p.split("(", 1)[0].strip(): p for p in parts}


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, dict[str, str]]:
    out = {}
    for arch in ("75", "80"):
        path = tmp_path_factory.mktemp(f"ptx{arch}") / "newton_schulz.ptx"
        subprocess.run([NVCC, "-std=c++17", "-O3", f"-arch=compute_{arch}", "-ptx", str(CSRC / "newton_schulz.cu"),
                        "-o", str(path)], check=True, capture_output=True)
        out[arch] = _ptx_entries(path.read_text())
    return out


@needs_build
def test_sm80_ptx_runs_the_16_bit_matmuls_on_mma_sync_with_cp_async(ptx):
    kernels = {name: body for name, body in ptx["80"].items() if _family(name) in MATMUL_KERNELS}
    tensor_core = {n: b for n, b in kernels.items() if _operand(n) != "fp32"}
    simt = {n: b for n, b in kernels.items() if _operand(n) == "fp32"}
    assert len(tensor_core) == 8 and len(simt) == 2  # symmetric 3 + update 5; fp32 of each kernel
    for name, body in tensor_core.items():
        assert "mma.sync.aligned.m16n8k16.row.col.f32" in body, f"{name}: no m16n8k16 mma.sync"
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body or "ldmatrix.sync.aligned.m8n8.x4.trans" in body
        # B·X reads its k×n panel transposed by ldmatrix; P·Pᵀ reads rows of P as they are.
        assert (".trans" in body) == ("ns_update" in name), name
        assert ("cp.async" in body) == ("CodePathE80" in name), f"{name}: cp.async only on the sm80 path"
        # The mma's operand type is the kernel's: ...m16n8k16.row.col.f32.bf16.bf16.f32 for bf16.
        assert ("f32.bf16.bf16.f32" in body) == (_operand(name) == "bf16"), name
        assert "wmma" not in body, name
    for name, body in simt.items():
        assert "mma.sync" not in body and "fma.rn.f32" in body, f"{name}: fp32 runs on the FMA units"


@needs_build
def test_sm75_ptx_has_fp16_mma_and_no_cp_async(ptx):
    sm75_path = {n: b for n, b in ptx["75"].items() if _family(n) in MATMUL_KERNELS and "CodePathE75" in n
                 and "__half" in n}
    assert len(sm75_path) == 3  # symmetric fp16; update fp16 → fp16 and fp16 → bf16
    for name, body in sm75_path.items():
        # sm_75 has no m16n8k16: each k16 product is two m16n8k8 (checked in the warp emulation).
        assert "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32" in body, name
        assert "m16n8k16" not in body and "ldmatrix.sync.aligned.m8n8.x4" in body, name
        assert "cp.async" not in body and ".bf16.bf16" not in body, name


# ---- availability -----------------------------------------------------------------------------

def test_cuda_backend_reports_why_it_cannot_run_here():
    ok, reason = available_backends()["cuda"]
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device; tests/gpu covers it")
    assert not ok
    assert reason.startswith(("extension not built", "no CUDA device", "driver too old"))
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run on cpu: cuda backend needs a CUDA tensor"
                       if BUILT else r"backend='cuda' cannot run on cpu: extension not built"):
        select_backend("cuda", torch.device("cpu"))


@needs_build
def test_the_device_query_runs_once_per_process(monkeypatch):
    """Each backend probe (every orthogonalize() call on a GPU probes every backend) read the driver
    and every device's properties again through cudaGetDeviceProperties: host time on each call. The
    driver and devices do not change while a process runs: the query is made once."""
    from muon_kernels import _C
    from muon_kernels import backends

    calls, query = [], _C.device_query

    def counted():
        calls.append(1)
        return query()

    monkeypatch.setattr(_C, "device_query", counted)
    backends._device_query.cache_clear()
    try:
        first = [available_backends()["cuda"] for _ in range(3)]
        assert len(calls) == 1 and first[0] == first[1] == first[2]
    finally:
        backends._device_query.cache_clear()


@needs_build
def test_an_extension_with_another_variant_table_layout_is_not_used(monkeypatch):
    """The statistics table's layout is shared by Python and _C (7 columns since the row stride): a
    _C built from older sources (an in-place build) would read it 6 at a time — other entries'
    values as addresses. Such an extension is reported unusable, on any machine."""
    from muon_kernels import _C, variants

    assert _C.VARIANT_TABLE_COLUMNS == variants.TABLE_COLUMNS
    monkeypatch.setattr(_C, "VARIANT_TABLE_COLUMNS", variants.TABLE_COLUMNS - 1)
    ok, reason = available_backends(torch.device("cuda"))["cuda"]
    assert not ok and reason.startswith("extension built from other sources than this package")


# ---- argument validation before launch --------------------------------------------------------

@needs_build
@pytest.mark.parametrize("call, message", [
    (lambda C: C.symmetric_matmul(p=0, d=0, c=256, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0), "symmetric_matmul: p is a null pointer"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=5, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0), "unknown dtype code 5"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=1, batch=1, m=100, k=128, alpha=1, beta=0, path=80,
                                  stream=0), "m = 100 must be a positive multiple of 128"),
    (lambda C: C.symmetric_matmul(p=264, d=0, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0), "p must be 16-byte aligned"),
    (lambda C: C.symmetric_matmul(p=256, d=512, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0), "c must not alias d"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=2, batch=1, m=128, k=128, alpha=1, beta=0, path=75,
                                  stream=0), "bfloat16 operands need the sm80 path"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=70,
                                  stream=0), "unknown code path 70"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0, splits=0), "symmetric_matmul: splits must be >= 1, got 0"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0, splits=2), "a split product \\(splits > 1\\) needs split_partial"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0, splits=2, split_partial=1032), "16-byte aligned fp32 buffer"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0, splits=2, split_partial=1024), "needs split_counters, batch · symmetric_tiles"),
    (lambda C: C.symmetric_matmul(p=256, d=0, c=512, dtype=1, batch=1, m=128, k=128, alpha=1, beta=0, path=80,
                                  stream=0, splits=2, split_partial=1024, split_counters=2), "needs split_counters"),
    (lambda C: C.split_partial_elements(batch=1, m=128, splits=0), "splits >= 1"),
    (lambda C: C.newton_schulz(input=256, in_dtype=0, in_strides=(6, 3, 1), batch=1, rows=2, cols=3, x=512,
                               y=640, a=768, b=1024, work_dtype=0, out=2048, out_dtype=0, partial=4096,
                               denom=8192, coefficients=[3.4, -4.7, 2.0], norm_scale=1, norm_offset=0,
                               floor=1e-7, path=80, stream=0, square_splits=0), "square_splits must be >= 1"),
    (lambda C: C.newton_schulz(input=256, in_dtype=0, in_strides=(6, 3, 1), batch=1, rows=2, cols=3, x=512,
                               y=640, a=768, b=1024, work_dtype=0, out=2048, out_dtype=0, partial=4096,
                               denom=8192, coefficients=[3.4, -4.7, 2.0], norm_scale=1, norm_offset=0,
                               floor=1e-7, path=80, stream=0, gram_splits=3), "newton_schulz: a split product"),
    (lambda C: C.ns_update(b=256, x=512, out=512, dtype=1, out_dtype=1, batch=1, m=128, n=128, out_rows=128,
                           out_cols=128, a=1, path=75, stream=0), "out must not alias x"),
    (lambda C: C.ns_update(b=256, x=512, out=768, dtype=0, out_dtype=2, batch=1, m=128, n=128, out_rows=128,
                           out_cols=128, a=1, path=75, stream=0), "a float32 iteration writes float32"),
    (lambda C: C.ns_update(b=256, x=512, out=768, dtype=1, out_dtype=1, batch=1, m=128, n=128, out_rows=129,
                           out_cols=128, a=1, path=75, stream=0), "out_rows × out_cols must lie within m × n"),
    (lambda C: C.normalize(input=256, in_dtype=0, in_strides=(6, 3, 1), batch=1, rows=2, cols=3, out=512,
                           out_dtype=0, out_rows=1, out_cols=3, partial=768, denom=1024, norm_scale=1,
                           norm_offset=0, floor=1e-7, stream=0), "must cover the input"),
    (lambda C: C.newton_schulz(input=256, in_dtype=0, in_strides=(6, 3, 1), batch=1, rows=2, cols=3, x=512,
                               y=512, a=768, b=1024, work_dtype=0, out=2048, out_dtype=0, partial=4096,
                               denom=8192, coefficients=[3.4, -4.7, 2.0], norm_scale=1, norm_offset=0,
                               floor=1e-7, path=80, stream=0), "x and y, and a and b, must be distinct"),
    (lambda C: C.newton_schulz(input=256, in_dtype=0, in_strides=(6, 3, 1), batch=1, rows=2, cols=3, x=512,
                               y=640, a=768, b=1024, work_dtype=0, out=2048, out_dtype=0, partial=4096,
                               denom=8192, coefficients=[3.4, -4.7], norm_scale=1, norm_offset=0, floor=1e-7,
                               path=80, stream=0), "3 numbers \\(a, b, c\\) per step, got 2"),
    (lambda C: C.newton_schulz(input=256, in_dtype=1, in_strides=(6, 3, 1), batch=1, rows=2, cols=3, x=512,
                               y=640, a=768, b=1024, work_dtype=1, out=2048, out_dtype=0, partial=4096,
                               denom=8192, coefficients=[3.4, -4.7, 2.0], norm_scale=1, norm_offset=0,
                               floor=1e-7, path=75, stream=0), "out_dtype must equal work_dtype"),
    (lambda C: C.fused_momentum(grads=[256], bufs=[512, 768], numels=[6], stack_offsets=[0], rows=[2], cols=[3],
                                transposed=[0], grad_dtype=0, buf_dtype=0, momenta=1024, stack=2048, ema=True,
                                nesterov=True, stream=0), "one entry per tensor \\(2\\)"),
    (lambda C: C.fused_momentum(grads=[256], bufs=[512], numels=[7], stack_offsets=[0], rows=[2], cols=[3],
                                transposed=[0], grad_dtype=0, buf_dtype=0, momenta=1024, stack=2048, ema=True,
                                nesterov=True, stream=0), "numel 7 is not a whole number of 2×3 matrices"),
    (lambda C: C.fused_momentum(grads=[256], bufs=[512], numels=[6], stack_offsets=[0], rows=[2], cols=[3],
                                transposed=[0], grad_dtype=2, buf_dtype=1, momenta=1024, stack=2048, ema=True,
                                nesterov=True, stream=0), "gradients' dtype or float32"),
    (lambda C: C.fused_apply_update(params=[0], numels=[6], stack_offsets=[0], rows=[2], cols=[3], transposed=[0],
                                    param_dtype=0, alphas=256, decays=512, stack=768, stack_dtype=0, cautious=False,
                                    stream=0),
     "tensor 0 is a null pointer"),
])
def test_extension_rejects_bad_arguments_before_any_cuda_call(call, message):
    from muon_kernels import _C

    with pytest.raises(ValueError, match=message):
        call(_C)


@needs_build
def test_backend_wrappers_name_the_bad_tensor_before_launch():
    from muon_kernels.backends import cuda_backend

    x = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match=r"cuda backend: x has dtype float64; its kernels take float32, float16, "
                                         r"bfloat16 here \(use backend='torch'"):
        cuda_backend.symmetric_matmul(x.double())
    with pytest.raises(ValueError, match=r"cuda backend: x is not contiguous \(shape \(2, 16, 8\), strides "
                                         r"\(128, 1, 16\)\); pass t.contiguous\(\)"):
        cuda_backend.symmetric_matmul(x.mT)
    with pytest.raises(ValueError, match=r"cuda backend: x is on cpu; the extension's kernels need CUDA tensors"):
        cuda_backend.symmetric_matmul(x)
    # Every tensor's dtype is checked before any tensor's device.
    with pytest.raises(ValueError, match=r"cuda backend: b has dtype float16; its kernels take float32 here"):
        cuda_backend.ns_update(torch.randn(2, 8, 8, dtype=torch.float16), x, 1.0)
    with pytest.raises(ValueError, match=r"cuda backend: stack is on cpu"):
        cuda_backend.orthogonalize(x.mT, NSConfig(KELLER * 5, 1e-7), torch.bfloat16)


@needs_build
def test_an_empty_fsdp2_shard_steps_on_the_torch_path(monkeypatch):
    """An FSDP2 rank that holds no rows of a matrix (a 1×24 matrix over two ranks: torch.chunk gives
    rank 1 none) steps its shard bucket on the torch path: the extension refuses an empty matrix
    view, and that rank alone raised mid-step while the others went on into the collectives. Rank 0's
    rows still go to the extension (whose launch fails here only for want of a driver)."""
    import contextlib

    from muon_kernels import distributed
    from muon_kernels.backends import cuda_backend
    from muon_kernels.bucket import Bucket, Entry, MatrixView

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # CPU tensors stand in
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    p = torch.randn(1, 24)
    bucket = Bucket(device=torch.device("cpu"), dtype=torch.float32, m=1, n=24, config=None, ns_dtype=torch.float32,
                    nesterov=True, momentum_form="ema", backend=cuda_backend, why="",
                    entries=[Entry(group=0, param=p, view=MatrixView(1, 1, 24, "2d"), scale=1.0)])
    groups = [{"momentum": 0.95, "lr": 0.02, "weight_decay": 0.1}]

    def rows_of(rank):
        shard = distributed.shard_bucket(bucket, 2, rank)
        return shard, [e.piece(torch.randn(1, 24)) for e in shard.entries], [e.piece(torch.zeros(1, 24))
                                                                           for e in shard.entries]

    shard, grads, bufs = rows_of(1)
    stack = cuda_backend.momentum_stack(shard, grads, bufs, groups, {})
    assert stack.numel() == 0
    before = p.clone()
    cuda_backend.apply_update(shard, stack, groups, {})
    assert torch.equal(p, before)
    with pytest.raises(RuntimeError, match="fused_momentum: launch failed"):
        cuda_backend.momentum_stack(*rows_of(0), groups, {})


@needs_build
def test_code_path_switch_is_validated(monkeypatch):
    from muon_kernels.backends import cuda_backend

    monkeypatch.setenv("MUON_KERNELS_CUDA_PATH", "sm70")
    with pytest.raises(ValueError, match=r"MUON_KERNELS_CUDA_PATH='sm70' is not a code path: set it to 'sm75'"):
        cuda_backend.code_path(torch.device("cuda"))
    monkeypatch.setenv("MUON_KERNELS_CUDA_PATH", "sm75")
    assert cuda_backend.code_path(torch.device("cuda")) == cuda_backend.SM75
    assert cuda_backend.work_dtype(torch.bfloat16, cuda_backend.SM75) == torch.float16
    assert cuda_backend.work_dtype(torch.bfloat16, cuda_backend.SM80) == torch.bfloat16
    assert cuda_backend.work_dtype(torch.float32, cuda_backend.SM75) == torch.float32


def test_extension_arch_coverage_rule():
    from muon_kernels.backends import _extension_runs_on

    assert _extension_runs_on((8, 6), "75,80,86,89,90")
    assert _extension_runs_on((8, 7), "80")  # sm_80 SASS runs on 8.x
    assert _extension_runs_on((12, 0), "75,90")  # newest PTX JIT-compiles forward
    assert not _extension_runs_on((8, 6), "90")  # built on the GPU machine for sm_90 only
    assert not _extension_runs_on((7, 5), "80,90")


@needs_build
def test_auto_takes_the_extension_where_triton_cannot_run(monkeypatch):
    """A Turing GPU (or no Triton): backend='auto' routes every bucket to the extension, not to torch."""
    import muon_kernels.backends as backends
    from muon_kernels.backends import cuda_backend

    monkeypatch.setitem(backends._STATUS, "triton", lambda device: (False, "compute capability 7.5 < 8.0"))
    monkeypatch.setitem(backends._STATUS, "cuda", lambda device: (True, "extension on compute capability 7.5"))
    module, why = select_backend("auto", torch.device("cuda"), 768, 3072, torch.bfloat16)
    assert module is cuda_backend and why == "auto: no usable Triton, compiled extension available"
    monkeypatch.setitem(backends._STATUS, "cuda", lambda device: (False, "extension not built"))
    module, why = select_backend("auto", torch.device("cuda"), 768, 3072, torch.bfloat16)
    assert module.NAME == "torch" and why == "auto: neither Triton nor the extension can run here"


@needs_build
@needs_build
def test_split_workspace_and_split_rule(monkeypatch):
    """Split-K on the extension's symmetric products: the workspace holds one fp32 128² tile per
    (matrix, output tile, slice); the rule is the Triton kernels' fixed split_factor on 128-wide
    tiles, 32-deep K steps and the device's SM count (an H200's 132 here)."""
    from muon_kernels import _C
    from muon_kernels.backends import cuda_backend

    assert _C.split_partial_elements(batch=1, m=1024, splits=3) == 36 * 3 * 128 * 128
    assert _C.split_partial_elements(batch=2, m=1000, splits=2) == 2 * 36 * 2 * 128 * 128  # m is padded
    assert _C.split_partial_elements(batch=48, m=768, splits=1) == 0
    monkeypatch.setattr(cuda_backend, "sm_count", lambda device: 132)
    gpu, bf16 = torch.device("cuda"), torch.bfloat16
    assert cuda_backend.splits(1, 1024, 4096, bf16, gpu) == 3     # X·Xᵀ at 1024×4096: 36 tiles, 128 K steps
    assert cuda_backend.splits(1, 1024, 1024, bf16, gpu) == 1     # A·A there: 32 K steps, not worth a reduction
    assert cuda_backend.splits(1, 4096, 4096, bf16, gpu) == 1     # 528 tiles fill the GPU
    assert cuda_backend.splits(48, 768, 768, bf16, gpu) == 1      # 1008 tiles
    from muon_kernels.triton_kernels.config import split_factor
    for batch, m, k in [(1, 768, 3072), (1, 2048, 8192), (3, 1024, 4096), (1, 128, 65536)]:
        t = m // 128
        for dtype, step in ((bf16, 32), (torch.float16, 32), (torch.float32, 8)):  # the kernels' K steps
            assert cuda_backend.splits(batch, m, k, dtype, gpu) == split_factor(batch * t * (t + 1) // 2, k // step, 132)


@needs_build
def test_the_cublas_path_is_offered_to_the_measuring_mode_on_a_gpu():
    """After the extension's own kernels, "cublas" (its normalization, cuBLAS's products) on a GPU;
    nothing but the kernels elsewhere."""
    from muon_kernels.backends import cuda_backend

    config = NSConfig(KELLER * 5, 1e-7)
    gpu = torch.device("cuda")
    assert cuda_backend.paths(1024, 4096, torch.bfloat16, gpu, config) == ("sm80", "cublas")
    assert cuda_backend.paths(1024, 4096, torch.float32, gpu, config) == ("simt", "cublas")
    assert cuda_backend.paths(1024, 4096, torch.bfloat16, torch.device("cpu"), config) == ("sm80",)
    assert cuda_backend.kernel_path(1024, 4096, torch.bfloat16, gpu, config, "cublas")[0] == "cublas"


def test_workspace_cap_counts_the_padding():
    """max_workspace_bytes chunks a bucket by what the backend really allocates: the cuda backend's
    work buffers are padded to multiples of 128, the torch backend's are not."""
    from muon_kernels.backends import cuda_backend, torch_backend
    from muon_kernels.plan import Bucket

    def bucket(backend):
        return Bucket(torch.device("cpu"), torch.float32, 100, 300, NSConfig(KELLER * 5, 1e-7), torch.bfloat16,
                      True, "ema", backend, "test")

    assert cuda_backend.padded(100) == 128 and cuda_backend.padded(256) == 256
    assert bucket(torch_backend).matrix_bytes() == 4 * 100 * 300 + 2 * (2 * 100 * 300 + 2 * 100 * 100)
    assert bucket(cuda_backend).matrix_bytes() == 4 * 100 * 300 + 2 * (2 * 128 * 384 + 2 * 128 * 128)
