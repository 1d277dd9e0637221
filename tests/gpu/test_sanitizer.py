"""compute-sanitizer (racecheck, synccheck, initcheck, memcheck) over every CUDA and Triton kernel
on a small shape set (tests/gpu/sanitizer_workload.py). Skipped only where the tool is absent or
refuses the device itself (a gVisor machine: "Device not supported", then error 999), with its words."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _sanitizer() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "compute-sanitizer").is_file():
            return str(Path(home, "bin", "compute-sanitizer"))
    return shutil.which("compute-sanitizer")


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(_sanitizer() is None, reason="compute-sanitizer is not installed")]


_REFUSED: list[str] = []  # the tool's own line, once it refused this device: the other tools skip at once


@pytest.mark.parametrize("tool", ["memcheck", "initcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_finds_nothing(tool):
    if _REFUSED:
        pytest.skip(f"compute-sanitizer refuses this device: {_REFUSED[0]}")
    # Without torch's caching allocator every buffer is its own allocation, so initcheck sees a
    # read of memory nobody wrote (a broken "padding holds zeros" contract) instead of old data.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    run = subprocess.run([_sanitizer(), f"--tool={tool}", "--error-exitcode=1", "--target-processes=all",
                          sys.executable, str(HERE / "sanitizer_workload.py")],
                         capture_output=True, text=True, timeout=240, env=env)
    refusal = next((line.strip() for line in (run.stdout + run.stderr).splitlines() if "Device not supported" in line),
                   None)
    if run.returncode != 0 and refusal is not None:
        _REFUSED.append(refusal)
        pytest.skip(f"compute-sanitizer refuses this device: {refusal}")
    assert run.returncode == 0 and "workload done" in run.stdout, (run.stdout + run.stderr)[-6000:]
