"""The tensor-core GEMM's index arithmetic, replayed on the host (tests/csrc/warp_tile_emulation.cpp):
copies into the swizzled shared tiles, ldmatrix and mma.sync as the PTX ISA defines them, and the
epilogue's output positions, through the same csrc/tile_layout.h functions the kernel calls. No
GPU runs the kernel here, so this is where a wrong fragment layout or swizzle shows up."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


def test_block_products_match_the_triple_loop(tmp_path):
    assert CXX is not None, "a host C++ compiler (g++) is needed to build the CUDA extension anyway"
    exe = tmp_path / "warp_tile_emulation"
    subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "csrc" / "warp_tile_emulation.cpp"), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "ok K-major block product over 1 k tiles",
        "ok K-major block product over 3 k tiles",
        "ok N-major block product over 1 k tiles",
        "ok N-major block product over 3 k tiles",
        "ok sm_75 split of m16n8k16 into two m16n8k8",
        "ok split-K slices cover K exactly, none empty",
    ]


def test_emulation_models_the_kernel_it_checks():
    """The emulation's constants and register choices are the kernel's: same tile table, same
    B-fragment registers, same sm_75 k8 split."""
    emulation = (ROOT / "tests" / "csrc" / "warp_tile_emulation.cpp").read_text()
    common = (ROOT / "csrc" / "common.cuh").read_text()
    gemm = (ROOT / "csrc" / "gemm.cuh").read_text()
    table = re.search(r"struct TensorCoreTiles \{(.*?)\};", common, re.S).group(1)
    assert "kBlockM = 128, kBlockN = 128, kBlockK = 32" in table and "kWarpsM = 2, kWarpsN = 2" in table
    assert "BM = 128, BN = 128, BK = 32, kWarpsM = 2, kWarpsN = 2" in emulation
    for line in ("fb[2 * j][0] = r[0];", "fb[2 * j][1] = r[1];", "fb[2 * j + 1][0] = r[2];", "fb[2 * j + 1][1] = r[3];"):
        assert line in gemm
    assert '"r"(a[2 * h]), "r"(a[2 * h + 1]), "r"(b[h])' in common
    # Every shared address and output position in the tensor-core GEMM goes through tile_layout.h.
    tensor_core = gemm.split("struct TensorCoreGemm", 1)[1].split("struct SimtGemm", 1)[0]
    for call in ("ATile::copy_position", "BTile::copy_position", "ATile::offset", "BTile::offset", "Warp::a_source",
                 "Warp::b_source", "Warp::c_position"):
        assert call in tensor_core, call
