"""Launch shapes a GPU would refuse, found without one: a batch of 100,000 tiny matrices (more than
grid axis 1 holds), every launch of both Newton–Schulz paths and the fused kernels recorded."""

from __future__ import annotations

import pytest
import torch

from gpu_limits import check_grid
from muon_kernels.ns_config import resolve_ns_config
from muon_kernels.triton_kernels import fused_update, newton_schulz, small_newton_schulz, symmetric_matmul

KERNELS = [
    (newton_schulz, "_sum_squares_kernel"), (newton_schulz, "_scale_cast_kernel"), (newton_schulz, "_ns_update_kernel"),
    (symmetric_matmul, "_symmetric_matmul_kernel"), (small_newton_schulz, "_small_newton_schulz_kernel"),
    (fused_update, "_fused_momentum_kernel"), (fused_update, "_fused_apply_update_kernel"),
]


@pytest.fixture
def launches(monkeypatch):
    """Replace every kernel by a recorder of its grid: the shapes are checked, nothing is computed."""
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((self.name, grid))

    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Recorder(name))
    return seen


@pytest.mark.parametrize("path", ["symmetric", "small"])
def test_a_batch_of_100000_tiny_matrices_launches_within_cuda_limits(launches, path):
    stack = torch.zeros(100_000, 3, 5)
    run = newton_schulz.newton_schulz if path == "symmetric" else small_newton_schulz.small_newton_schulz
    run(stack, resolve_ns_config("keller", 2, 1e-7), torch.float32)
    names = {name for name, _ in launches}
    assert {"_sum_squares_kernel", "_scale_cast_kernel"} <= names
    assert ("_symmetric_matmul_kernel" in names) == (path == "symmetric")
    for name, grid in launches:
        check_grid(name, grid)


def test_fused_kernels_over_100000_tensors_launch_within_cuda_limits(launches):
    views = [(1, 3, 5, False, False, 5)] * 100_000
    layout = fused_update.make_layout(views, torch.device("cpu"))
    tensors = [torch.zeros(3, 5) for _ in range(4)] * 25_000
    stack = torch.zeros(100_000, 3, 5)
    fused_update.fused_momentum(tensors, tensors, torch.zeros(200_000), layout, stack, ema=True, nesterov=True)
    fused_update.fused_apply_update(tensors, torch.zeros(100_000), torch.zeros(100_000), layout, stack)
    assert len(launches) == 2
    for name, grid in launches:
        check_grid(name, grid)
