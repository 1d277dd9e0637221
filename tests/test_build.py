"""The optional CUDA extension: built by `pip install .` when nvcc exists, importable without a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import muon_kernels as mk

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
SKIPPED = os.environ.get("MUON_KERNELS_SKIP_CUDA_BUILD") == "1"
EXPECTED_ARCHS = os.environ.get("MUON_KERNELS_CUDA_ARCHS", "75;80;86;89;90").split(";")


def test_extension_presence_matches_the_build_machine():
    ok, reason = mk.available_backends()["cuda"]
    if NVCC is None or SKIPPED:
        assert not ok and reason.startswith("extension not built")
        return
    from muon_kernels import _C

    info = _C.build_info()
    assert info["archs"].split(",") == EXPECTED_ARCHS
    assert info["cuda_version"] >= 12000
    query = _C.device_query()
    assert set(query) == {"device_count", "driver_version", "runtime_version", "error", "capabilities", "names"}
    assert len(query["capabilities"]) == query["device_count"]
    if not torch.cuda.is_available():
        assert not ok and reason.startswith(("no CUDA device", "driver too old"))


@pytest.mark.skipif(NVCC is None or SKIPPED, reason="nvcc is not on this machine, so _C was not built")
def test_extension_carries_sass_for_every_requested_arch():
    from muon_kernels import _C

    # The toolkit's cuobjdump when it has one, else the copy that ships inside the triton wheel.
    cuobjdump = Path(NVCC).parent / "cuobjdump"
    if not cuobjdump.is_file():
        import triton

        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    listing = subprocess.run([str(cuobjdump), "--list-elf", _C.__file__], capture_output=True, text=True, check=True)
    archs = {line.rsplit(".sm_", 1)[1].split(".")[0] for line in listing.stdout.splitlines() if ".sm_" in line}
    assert archs == set(EXPECTED_ARCHS)


@pytest.mark.skipif(NVCC is None or SKIPPED, reason="nvcc is not on this machine, so _C is not built")
def test_wheel_carries_the_extension(tmp_path):
    """What `make wheel` runs: the wheel holds _C and the dispatch table next to the Python package."""
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("muon_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("muon_kernels/_C.") and n.endswith(".so") for n in names)
    assert {"muon_kernels/backends/cuda_backend.py", "muon_kernels/backends/crossovers.json",
            "muon_kernels/triton_kernels/newton_schulz.py"} <= set(names)
