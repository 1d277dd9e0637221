"""Tests of the Triton kernels on the CPU interpreter.

They run only in a process started with TRITON_INTERPRET=1 (the flag must be set before the
kernels are defined); tests/test_triton_interpreter.py starts one per file, under each Triton version.
"""

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/oracles.py, tests/host_copies.py


@pytest.fixture(autouse=True)
def cuda_grid_limits(monkeypatch):
    """Every interpreted launch is checked against the limits a GPU would enforce."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime.interpreter import InterpretedFunction

    from gpu_limits import check_grid

    run = InterpretedFunction.run

    def checked_run(self, *args, grid, warmup, **kwargs):
        check_grid(getattr(self.fn, "__name__", "kernel"), grid(kwargs) if callable(grid) else grid)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
