"""The Triton launchers' grids at the sizes users train (LLaMA-70B's MLP stack, a 128k-wide matrix,
a 2M-neuron statistics pass) stay inside CUDA's grid limits, checked on meta tensors: the launch
itself is recorded, not run, so no GPU and no memory is needed."""

import pytest
import torch

triton = pytest.importorskip("triton")

from muon_kernels.ns_config import NSConfig  # noqa: E402
from muon_kernels.triton_kernels import config, newton_schulz, symmetric_matmul, variant_statistics  # noqa: E402

GRID_LIMITS = (2**31 - 1, 65535, 65535)


@pytest.fixture
def grids(monkeypatch):
    """Records (kernel, grid) per launch, with the launchers' sm_90 choices (132 SMs, no autotuning)."""
    recorded = []

    def record(kernel, grid, *args, **kwargs):
        recorded.append((kernel.fn.__name__, grid))

    def choose(kind, device, dtype, m, n, k, trial):
        return config.matmul_config(device, dtype, m, n, k, arch=90, kind=kind)

    for module in (symmetric_matmul, newton_schulz, variant_statistics):
        monkeypatch.setattr(module, "launch", record)
    for module in (symmetric_matmul, newton_schulz):
        monkeypatch.setattr(module, "sm_count", lambda device: 132)
    monkeypatch.setattr(symmetric_matmul.autotune, "choose", choose)  # one autotune module serves both
    monkeypatch.setattr(symmetric_matmul, "arch_of", lambda index: 90)
    return recorded


def _within_limits(recorded):
    assert recorded
    for name, grid in recorded:
        assert len(grid) <= 3 and all(1 <= g <= limit for g, limit in zip(grid, GRID_LIMITS)), (name, grid)


@pytest.mark.parametrize("shape", [(80, 8192, 28672), (1, 8192, 131072), (48, 768, 3072)])
def test_newton_schulz_launches_fit_the_grid(grids, shape):
    X = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    newton_schulz.normalize(X, NSConfig(((3.4445, -4.775, 2.0315),), 1e-7), torch.bfloat16)
    A = symmetric_matmul.symmetric_matmul(X)
    symmetric_matmul.symmetric_matmul(A, alpha=2.0, D=A, beta=-4.7)
    newton_schulz.ns_update(A, X, 3.4445)
    _within_limits(grids)


@pytest.mark.parametrize("k,n", [(1, 2**21), (3, 1_048_561), (40_000, 64)])
def test_statistics_launch_fits_the_grid_at_any_width(grids, k, n):
    """More than 65,535 blocks of neurons in one matrix (n > 1,048,560), or matrices: one grid axis."""
    ortho = torch.empty((k, 16, n), dtype=torch.bfloat16, device="meta")
    table = torch.empty((k, 7), dtype=torch.int64, device="meta")
    variant_statistics.variant_statistics(ortho, table, None, param_dtype=torch.bfloat16, normuon=False,
                                          hyperball=True, beta2=0.95, eps=1e-8)
    _within_limits(grids)
    assert grids == [("_variant_statistics_kernel", (k * variant_statistics.blocks(n),))]


def test_a_triangle_beyond_int32_tile_coordinates_is_refused():
    cfg = config.MatmulConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    side = 23169  # 23169·23170/2 <= 2^28 < 23170·23171/2
    assert symmetric_matmul.launch_shape(1, side * 64, 64, cfg, 132)[0] == side * (side + 1) // 2
    with pytest.raises(ValueError, match="int32 tile coordinates"):
        symmetric_matmul.launch_shape(1, (side + 1) * 64, 64, cfg, 132)


@pytest.mark.parametrize("axis, limit", [(0, 2**31 - 1), (1, 65535), (2, 65535)])
def test_a_grid_one_program_past_cudas_limit_is_refused(axis, limit):
    assert config.checked_grid(limit, "kernel", axis) == limit
    with pytest.raises(ValueError, match=f"kernel: {limit + 1} programs exceed CUDA's grid limit of {limit} on axis "
                                         f"{axis}; lower max_workspace_bytes"):
        config.checked_grid(limit + 1, "kernel", axis)
