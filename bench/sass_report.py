"""Compile every Triton kernel ahead of time for an NVIDIA arch and report what the SASS holds.

No GPU is needed: ``triton.compile`` with a ``GPUTarget`` produces the cubin, and the
``nvdisasm`` and ``cuobjdump`` that ship inside the triton wheel read its instructions and resource usage. Each
kernel is specialized the way the runtime specializes a typical launch (pointers and sizes
divisible by 16, unit strides as constants), because that is what decides vector loads,
pipelining and register use.

    python bench/sass_report.py --arch 90 [--json] [--names symmetric ns_update]

One row per kernel × config × dtype: name, arch, dtype, config, is_matmul,
tensor_core_instructions, warpgroup_mma_instructions (HGMMA), tma_instructions (UTMALDG),
shared_bytes, registers, spills, calls (CALL instructions: a called routine such as int64 division),
instructions (static SASS count, every branch once), vector_accesses (16-byte-or-wider global
loads and stores). Configs are every one the table, opt-in autotuning or
bench/tune.py can pick (config.all_configs); a "+tma" config label means descriptor loads.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from muon_kernels.triton_kernels import config as kcfg
from muon_kernels.triton_kernels import fused_update, small_newton_schulz, variant_statistics
from muon_kernels.triton_kernels.newton_schulz import _ns_update_kernel, _scale_cast_kernel, _sum_squares_kernel
from muon_kernels.triton_kernels.symmetric_matmul import _symmetric_matmul_kernel, fixup_rows

TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64", "i8": "i8", "i32": "i32", "i64": "i64"}
_TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "i8": tl.int8}
# Tensor-core instruction families by arch: mma.sync (HMMA) through Ampere/Ada, wgmma (HGMMA) on Hopper.
# sm_100 runs Triton's dots on the 5th-generation tensor cores (tcgen05: UTC*MMA); sm_120 on HMMA.
TENSOR_CORE_OPCODES = {80: ("HMMA",), 86: ("HMMA",), 89: ("HMMA",), 90: ("HGMMA", "HMMA"),
                       100: ("UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCIMMA", "HMMA"), 120: ("HMMA",)}
# Archs every supported Triton (3.6…3.9) must target; newer ones are checked where it does.
REQUIRED_ARCHS = (80, 86, 89, 90)


@dataclass
class Row:
    name: str
    arch: int
    dtype: str
    config: str
    is_matmul: bool
    tensor_core_instructions: int
    warpgroup_mma_instructions: int  # Hopper's HGMMA alone (wgmma), a subset of the above
    tma_instructions: int  # UTMALDG: tiles loaded by Hopper's copy engine from a TMA descriptor
    shared_bytes: int
    registers: int
    spills: int
    expects_tensor_cores: bool
    calls: int = 0  # CALL instructions: a called routine (ptxas's int64 division, say) in the kernel
    instructions: int = 0  # SASS instructions in the kernel (static: every branch counted once)
    vector_accesses: int = 0  # global loads and stores of 16 bytes or more (LDG/STG .128/.256)


@dataclass(frozen=True)
class Desc:
    """A host TMA descriptor argument: element type and box (triton.tools.tensor_descriptor)."""
    dtype: str
    block: tuple[int, ...]

    def signature(self) -> str:
        return f"tensordesc<{_TYPES[self.dtype]}[{','.join(map(str, self.block))}]>"


def _specialize(fn, args: dict, constexprs: dict):
    """Signature, constexprs and attrs as the JIT would derive them from these argument values."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for name, value in args.items():
        index = (fn.arg_names.index(name),)
        if isinstance(value, Desc):
            signature[name] = value.signature()
        elif value is None:  # an absent optional argument (a descriptor on the pointer path)
            consts[name] = None
        elif isinstance(value, str):  # a pointer to this element type
            signature[name] = "*" + _TYPES[value]
            attrs[index] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            consts[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
    for name in consts:
        signature[name] = "constexpr"
    return {n: signature[n] for n in fn.arg_names}, consts, attrs


def compile_kernel(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """``fn`` compiled for ``arch`` as the package launches it (its fp-fusion setting included)."""
    signature, consts, attrs = _specialize(fn, args, constexprs)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={
        "num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": kcfg.fp_fusion(fn)})


def _code(cubin: bytes) -> bytes:
    """The kernel's machine code: its ELF's ``.text.*`` sections, in file order."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entry, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entry) for i in range(count)]
    strings = headers[names][4]
    code = b""
    for name, _type, _flags, _addr, offset, size in headers:
        if cubin[strings + name:cubin.index(b"\0", strings + name)].startswith(b".text."):
            code += cubin[offset:offset + size]
    return code


def disassemble(cubins: list[bytes], arch: int) -> list[str]:
    """Each cubin's SASS, one instruction per line, from ONE nvdisasm call.

    nvdisasm spends ~0.35 s setting up an arch before it reads a byte, whatever the file's size
    (measured: a 16-byte input takes as long as a 30-KB kernel), and it reads one ELF per call. Its
    raw mode (``-b SMxy``) decodes a bare instruction stream instead: the kernels' code sections
    concatenated are disassembled at once and split back by byte offset. Volta and later encode
    every instruction in 16 self-contained bytes, so each one decodes the same wherever it sits;
    only branch targets print as offsets where an ELF would name labels (nothing here reads them).
    """
    codes = [_code(c) for c in cubins]
    starts, end = [], 0
    for code in codes:
        starts.append(end)
        end += len(code)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "code.bin")
        path.write_bytes(b"".join(codes))
        text = subprocess.run([str(TRITON_BIN / "nvdisasm"), "-b", f"SM{arch}", str(path)], capture_output=True,
                              text=True, check=True).stdout
    lines: list[list[str]] = [[] for _ in codes]
    kernel = 0
    for line in text.splitlines():
        offset = re.match(r"\s+/\*([0-9a-f]{4,})\*/", line)
        if offset:
            while kernel + 1 < len(codes) and int(offset.group(1), 16) >= starts[kernel + 1]:
                kernel += 1
            lines[kernel].append(line)
    return ["\n".join(x) for x in lines]


def inspect_cubins(cubins: list[bytes], arch: int) -> list[tuple[int, int, int, int, int, int, int, int]]:
    """Per cubin: (tensor-core instruction count, HGMMA count, UTMALDG count, registers, spilled bytes,
    CALL instructions, all instructions, 16-byte-or-wider global accesses) from nvdisasm and cuobjdump."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "kernel.cubin")
        for cubin, sass in zip(cubins, disassemble(cubins, arch)):
            path.write_bytes(cubin)  # cuobjdump's resource summary takes milliseconds: one call per cubin
            usage = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-res-usage", str(path)], capture_output=True,
                                   text=True, check=True).stdout
            found.append((sum(len(re.findall(rf"\b{op}\b", sass)) for op in TENSOR_CORE_OPCODES[arch]),
                          len(re.findall(r"\bHGMMA\b", sass)), len(re.findall(r"\bUTMALDG\b", sass)),
                          int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)),
                          len(re.findall(r"\bCALL\.", sass)), len(sass.splitlines()),
                          len(re.findall(r"\b(?:LDG|STG)\.E(?:\.\w+)*?\.(?:128|256)\b", sass))))
    return found


@triton.jit
def _probe_kernel(X):
    tl.store(X, tl.load(X) + 1.0)


def targets(arch: int) -> bool:
    """Whether the installed Triton (and the ptxas it ships) can compile for sm_<arch>."""
    try:
        compile_kernel(_probe_kernel, {"X": "fp32"}, {}, arch, 1, 1)
    except Exception:  # an arch this Triton does not know fails in its backend, with varying types
        return False
    return True


def _symmetric_case(name, cfg, cfg_label, dtype, precision, m, k, *, arch, has_d=False, shift=False, split=False,
                    persistent=False, tensor_cores=True):
    tma = cfg.tma and dtype != "fp32"
    desc = Desc(dtype, (1, cfg.block_m, cfg.block_k)) if tma else None
    args = dict(X=dtype, Y=dtype, D=dtype, C=dtype, Partial="fp32", Counter="i32", X_desc=desc, Y_desc=desc, M=m, K=k,
                # A slice is a multiple of BLOCK_K at run time, so the JIT sees it divisible by 16.
                items=4096, splits=3 if split else 1,
                k_per_split=-(-k // (3 * cfg.block_k)) * cfg.block_k if split else k,
                stride_xb=m * k, stride_xm=k, stride_xk=1, stride_yb=m * k, stride_ym=k, stride_yk=1,
                stride_db=m * m, stride_dm=m, stride_dn=1, stride_cb=m * m, stride_cm=m, stride_cn=1,
                alpha=1.0, beta=0.0, shift=0.0)
    consts = dict(HAS_D=has_d, HAS_SHIFT=shift, SPLIT=split, BLOCK=cfg.block_m, BLOCK_K=cfg.block_k, UPCAST=False,
                  PRECISION=precision, TMA=tma, PERSISTENT=persistent,
                  ROWS=fixup_rows(cfg.block_m, 4 if dtype == "fp32" else 2, arch))
    return (name, _symmetric_matmul_kernel, args, consts, cfg_label, dtype, cfg.num_warps, cfg.num_stages, True,
            tensor_cores)


def _update_case(name, cfg, cfg_label, dtype, precision, m, n, *, persistent=False, tensor_cores=True):
    tma = cfg.tma and dtype != "fp32"
    args = dict(B=dtype, X=dtype, Out=dtype, B_desc=Desc(dtype, (1, cfg.block_m, cfg.block_k)) if tma else None,
                X_desc=Desc(dtype, (1, cfg.block_k, cfg.block_n)) if tma else None, M=m, N=n, items=4096,
                stride_bb=m * m, stride_bm=m, stride_bk=1, stride_xb=m * n, stride_xm=n, stride_xn=1,
                stride_ob=m * n, stride_om=n, stride_on=1, a=1.0)
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, UPCAST=False,
                  PRECISION=precision, TMA=tma, PERSISTENT=persistent)
    return (name, _ns_update_kernel, args, consts, cfg_label, dtype, cfg.num_warps, cfg.num_stages, True, tensor_cores)


def kernel_cases(arch: int):
    """(name, fn, args, constexprs, config label, dtype, num_warps, num_stages, is_matmul, expects tensor cores)."""
    matmul = []
    for label, cfg in kcfg.all_configs(arch).items():
        if label.startswith(("fp32", "tune32")):
            variants = [("fp32", "ieee", False), ("fp32", "tf32", True)]
        else:
            variants = [("bf16", "tf32", True), ("fp16", "tf32", True)]
        m, n = (1024, 4096) if label != "small16" else (64, 256)
        table = label in ("large16", "small16", "fp32")  # the default path: every epilogue variant
        for dtype, precision, tensor_cores in variants:
            cfg_label = f"{label}:{cfg.block_m}x{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}" \
                        f"{'+tma' if cfg.tma and dtype != 'fp32' else ''}:{precision}"
            case = dict(cfg=cfg, cfg_label=cfg_label, dtype=dtype, precision=precision, tensor_cores=tensor_cores)
            symmetric = dict(case, arch=arch)
            # The symmetric kernel takes square tiles (BLOCK = block_m); rectangles are ns_update-only.
            if cfg.block_m == cfg.block_n:
                matmul.append(_symmetric_case("symmetric_matmul[X·Xᵀ]", m=m, k=n, **symmetric))
                matmul.append(_symmetric_case("symmetric_matmul[b·A+c·A·A]", m=m, k=m, has_d=True, **symmetric))
                # Split: partials, the arrival counter and the last slice's fixup, with the narrowest
                # epilogue (X·Xᵀ) and the widest (b·R + c·R·R + a·I: D and the shift); ptxas's
                # register choices are not monotonic in the epilogue, so both are compiled.
                matmul.append(_symmetric_case("symmetric_matmul[split X·Xᵀ]", m=m, k=n, split=True, **symmetric))
                matmul.append(_symmetric_case("symmetric_matmul[split b·R+c·R·R+a·I]", m=m, k=n, split=True,
                                              has_d=True, shift=True, **symmetric))
                # Persistence is a launch choice on sm_90+ (config.PERSISTENT_MIN_ARCH; bench/tune.py
                # times it, split or not): its kernel has the outer item loop, compiled once per config
                # and precision, with and without the split, each with the epilogues the plain kernel has.
                persistent = dtype != "fp16" and arch >= kcfg.PERSISTENT_MIN_ARCH
                if persistent:
                    matmul.append(_symmetric_case("symmetric_matmul[persistent, split X·Xᵀ]", m=m, k=n,
                                                  split=True, persistent=True, **symmetric))
                    matmul.append(_symmetric_case("symmetric_matmul[persistent, split b·R+c·R·R+a·I]", m=m, k=n,
                                                  split=True, has_d=True, shift=True, persistent=True, **symmetric))
                    matmul.append(_symmetric_case("symmetric_matmul[persistent X·Xᵀ]", m=m, k=n, persistent=True,
                                                  **symmetric))
                    matmul.append(_symmetric_case("symmetric_matmul[persistent b·A+c·A·A]", m=m, k=m, has_d=True,
                                                  persistent=True, **symmetric))
                if table:
                    matmul.append(_symmetric_case("symmetric_matmul[b·R+c·R·R+a·I]", m=m, k=m, has_d=True,
                                                  shift=True, **symmetric))
                    if persistent:
                        matmul.append(_symmetric_case("symmetric_matmul[persistent b·R+c·R·R+a·I]", m=m, k=m,
                                                      has_d=True, shift=True, persistent=True, **symmetric))
            matmul.append(_update_case("ns_update[a·X+B·X]", m=m, n=n, **case))
            if dtype != "fp16" and arch >= kcfg.PERSISTENT_MIN_ARCH:
                matmul.append(_update_case("ns_update[persistent a·X+B·X]", m=m, n=n, persistent=True, **case))
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dtype, precision, tensor_cores in (("bf16", "tf32", True), ("fp16", "tf32", True), ("fp32", "ieee", False)):
        # The largest padded tile the byte budget admits at a 1:4 aspect (the shape of an MLP matrix).
        budget = small_newton_schulz.budget(torch_dtypes[dtype], arch)
        elt = 2 if dtype != "fp32" else 4
        block_m = 16
        while (2 * block_m) * (8 * block_m) * elt <= budget:
            block_m *= 2
        block_n = budget // (block_m * elt)
        m, n = block_m, block_n
        warps = small_newton_schulz.num_warps(block_m, block_n)
        args = dict(X=dtype, Out=dtype, Coefficients="fp32", M=m, N=n, steps=5)
        matmul.append(("small_newton_schulz", small_newton_schulz._small_newton_schulz_kernel, args,
                       dict(BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=False, PRECISION=precision),
                       f"{block_m}x{block_n}w{warps}:{precision}", dtype, warps, 1, True, tensor_cores))
    elementwise = []
    r, c = 1024, 4096
    tiles_c = c // 256
    for src in ("fp32", "bf16", "fp16"):
        shape = dict(R=r, C=c, tiles_c=tiles_c, tiles=(r // 64) * tiles_c, stride_gb=r * c, stride_gr=c, stride_gc=1)
        args = dict(G=src, Partial="fp32", Norm="fp32", Counter="i32", **shape, norm_scale=1.0, norm_offset=0.0,
                    floor=1e-7)
        elementwise.append(("normalize[sum_squares]", _sum_squares_kernel, args,
                            dict(BLOCK_R=64, BLOCK_C=256, BLOCK_P=1024), "64x256w4", src, 4, 1, False, False))
        for dst in ("bf16", "fp16", "fp32"):
            args2 = dict(G=src, Norm="fp32", Out=dst, **shape)
            elementwise.append(("normalize[scale_cast]", _scale_cast_kernel, args2,
                                dict(BLOCK_R=64, BLOCK_C=256), "64x256w4", f"{src}->{dst}", 4, 1, False, False))
    tables = dict(Meta="i64", Numels="i64", ChunkTensor="i32", ChunkStart="i64")
    # (param, buffer, stack, int8, stochastic): plain buffers, then low-precision momentum
    momentum_cases = [(p, b, b, False, False) for p, b in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"),
                                                           ("fp16", "fp16"))]
    momentum_cases += [("fp32", "bf16", "bf16", False, True), ("bf16", "bf16", "bf16", False, True),
                       ("fp32", "i8", "fp32", True, False), ("bf16", "i8", "bf16", True, True)]
    for param, buf, stack, int8, stochastic in momentum_cases:
        for ema in (True, False):
            args = dict(GradPtrs="i64", BufPtrs="i64", Momenta="fp32", Stack=stack, Seeds="i64", StepPtrs="i64",
                        ScalePtrs="i64", **tables)
            # 32-bit index arithmetic, as every launch below 2^31 elements compiles it; the int64
            # fallback once per kernel (fp32 ema) so that it stays checked too.
            # The 16-byte path (ALIGNED) beside the per-element one, for the plain buffers it serves.
            paths = [(True, False)] + [(True, True)] * (not (int8 or stochastic))
            if (param, buf, ema) == ("fp32", "fp32", True):
                paths.append((False, False))
            for index32, vector in paths:
                consts = dict(GRAD_DTYPE=_TL[param], BUF_DTYPE=_TL[buf], EMA=ema, NESTEROV=True,
                              BLOCK=fused_update.BLOCK, EMULATE_RN=False, INDEX32=index32, INT8=int8,
                              STOCHASTIC=stochastic, ALIGNED=vector)
                kind = ", ".join(filter(None, ["int8" if int8 else "bf16-stochastic" if stochastic else "",
                                               "" if index32 else "int64 index", "vector" if vector else ""]))
                name = f"fused_momentum[{'ema' if ema else 'sgd'}{', ' + kind if kind else ''}]"
                elementwise.append((name, fused_update._fused_momentum_kernel, args, consts,
                                    f"block{fused_update.BLOCK}w4", f"{param}/{buf}", 4, 1, False, False))
    variants = {"": (False, False, False), "[cautious]": (True, False, False),
                "[normuon+hyperball]": (False, True, True)}
    for param in ("fp32", "bf16", "fp16"):
        for ortho in ("bf16", "fp32"):
            for suffix, (cautious, normuon, hyperball) in variants.items():
                args = dict(ParamPtrs="i64", Alphas="fp32", Decays="fp32", Ortho=ortho, RowScale="fp32",
                            Gains="fp32", Shrink="fp32", NMAX=4096, **tables)
                paths = [(True, False), (True, True)] + [(False, False)] * ((param, ortho) == ("fp32", "bf16"))
                for index32, vector in paths:
                    consts = dict(PARAM_DTYPE=_TL[param], BLOCK=fused_update.BLOCK, EMULATE_RN=False,
                                  CAUTIOUS=cautious, NORMUON=normuon, HYPERBALL=hyperball, INDEX32=index32,
                                  ALIGNED=vector)
                    name = f"fused_apply_update{suffix}" + ("" if index32 else "[int64 index]") + \
                        ("[vector]" if vector else "")
                    elementwise.append((name, fused_update._fused_apply_update_kernel, args, consts,
                                        f"block{fused_update.BLOCK}w4", f"{param}<-{ortho}", 4, 1, False, False))
            args = dict(Ortho=ortho, Table="i64", RowScale="fp32", Partials="fp32", M=1024, N=4096,
                        BLOCKS=128, weight=0.05, eps=1e-10)
            consts = dict(PARAM_DTYPE=_TL[param], NORMUON=True, HYPERBALL=True, BLOCK_N=variant_statistics.BLOCK_N,
                          BLOCK_J=variant_statistics.BLOCK_J, EMULATE_RN=False)
            elementwise.append(("variant_statistics", variant_statistics._variant_statistics_kernel, args, consts,
                                f"{variant_statistics.BLOCK_N}x{variant_statistics.BLOCK_J}w4", f"{param}/{ortho}",
                                4, 1, False, False))
    args = dict(Partials="fp32", Alphas="fp32", Radius="fp32", Eps="fp64", Gains="fp32", Shrink="fp32", BLOCKS=192)
    elementwise.append(("variant_factors", variant_statistics._variant_factors_kernel, args,
                        dict(NORMUON=True, HYPERBALL=True, CHUNK=64), "chunk64w4", "fp32->fp64", 4, 1, False, False))
    return matmul + elementwise


def report(arch: int, names: tuple[str, ...] = ()) -> list[Row]:
    """Rows for every kernel case on ``arch`` (only those whose name contains one of ``names``, when given)."""
    cases = [case for case in kernel_cases(arch) if not names or any(n in case[0] for n in names)]
    compiled = [compile_kernel(fn, args, consts, arch, warps, stages)
                for _, fn, args, consts, _, _, warps, stages, _, _ in cases]
    rows = []
    for (name, _, _, _, label, dtype, _, _, is_matmul, tensor_cores), kernel, found in zip(
            cases, compiled, inspect_cubins([k.asm["cubin"] for k in compiled], arch)):
        count, warpgroup, tma, registers, spills, calls, instructions, vector = found
        rows.append(Row(name, arch, dtype, label, is_matmul, count, warpgroup, tma, kernel.metadata.shared,
                        registers, spills, tensor_cores, calls, instructions, vector))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, required=True, choices=kcfg.ARCHS)
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    parser.add_argument("--names", nargs="*", default=(), help="only kernels whose name contains one of these")
    args = parser.parse_args(argv)
    rows = report(args.arch, tuple(args.names))
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return 0
    cols = ["name", "arch", "dtype", "config", "is_matmul", "tensor_core_instructions", "warpgroup_mma_instructions",
            "tma_instructions", "shared_bytes", "registers", "spills", "calls", "instructions", "vector_accesses"]
    cells = [[str(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
