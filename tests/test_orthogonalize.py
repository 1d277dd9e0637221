"""orthogonalize() and the torch backend against the fp64 recurrence, SVD, and a plain bf16 baseline."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from oracles import controlled_spectrum, plain_recurrence, reference_ns, rel_err, scalar_map
from muon_kernels.ns_config import PRESETS, resolve_ns_config

# DESIGN.md §5: fp32 iteration ≤ 1e-4 relative to the fp64 recurrence; bf16/fp16 iteration
# ≤ 2 × (error of a plain torch matmul recurrence in that dtype) + 1e-2.
FP32_TOL = 1e-4

ODD_SHAPES = [(1, 9), (9, 1), (7, 13), (13, 7), (31, 31), (64, 17), (17, 64), (5, 1, 8), (3, 11, 6), (2, 2, 5, 7)]


def _input(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fp32_iteration_matches_fp64_recurrence(shape, preset, gen):
    G = _input(shape, torch.float32, gen)
    out = mk.orthogonalize(G, ns_coefficients=preset, ns_dtype=torch.float32)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert rel_err(out, reference_ns(G, preset)) <= FP32_TOL


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_iteration_within_baseline_error(shape, ns_dtype, in_dtype, gen):
    G = _input(shape, in_dtype, gen)
    ref = reference_ns(G)
    out = mk.orthogonalize(G, ns_dtype=ns_dtype)
    assert out.shape == G.shape and out.dtype == in_dtype
    bound = 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2
    assert rel_err(out, ref) <= bound


def test_fp64_input_keeps_its_dtype(gen):
    G = _input((3, 9, 14), torch.float64, gen)
    out = mk.orthogonalize(G, ns_dtype=torch.float32)
    assert out.dtype == torch.float64
    assert rel_err(out, reference_ns(G)) <= FP32_TOL


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("ns_steps", [1, 3, 5, 7])
def test_scalar_map_on_diagonal_input(preset, ns_steps):
    D, expected = scalar_map(preset, ns_steps)
    out = mk.orthogonalize(D, ns_coefficients=preset, ns_steps=ns_steps, ns_dtype=torch.float32)
    assert torch.count_nonzero(out - torch.diag(out.diagonal())) == 0
    torch.testing.assert_close(out.diagonal().double(), expected, rtol=0, atol=FP32_TOL)


def test_per_step_list_repeats_last_tuple():
    custom = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    G = torch.randn(6, 10, dtype=torch.float64)
    out = mk.orthogonalize(G.float(), ns_coefficients=custom, ns_steps=4, ns_dtype=torch.float32)
    explicit = custom + [custom[-1]] * 2
    assert rel_err(out, reference_ns(G, explicit, 4)) <= FP32_TOL
    assert resolve_ns_config(custom, 1, 0.0).coefficients == (custom[0],)


@pytest.mark.parametrize(
    "preset, band", [("keller", (0.68, 1.21)), ("quintic", (0.7, 1.2)), ("polar_express", (0.7, 1.2))]
)
@pytest.mark.parametrize("shape", [(48, 48), (24, 80), (80, 24)])
def test_singular_values_land_in_band(preset, band, shape, gen):
    k = min(shape)
    sigma = torch.logspace(-1, 0, k, dtype=torch.float64)
    sigma = sigma / sigma.norm()
    assert sigma.min() >= 1e-2  # the controlled-spectrum condition of DESIGN.md §5
    G = controlled_spectrum(*shape, sigma, gen)
    out = mk.orthogonalize(G.float(), ns_coefficients=preset, ns_dtype=torch.float32)
    s = torch.linalg.svdvals(out.double())
    assert band[0] <= s.min().item() and s.max().item() <= band[1]
    # Same singular vectors as the SVD polar factor: out·(UVᵀ)ᵀ is symmetric positive definite.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    P = out.double() @ (U @ Vh).T if shape[0] <= shape[1] else (U @ Vh).T @ out.double()
    assert torch.allclose(P, P.T, atol=1e-4)
    assert torch.linalg.eigvalsh((P + P.T) / 2).min() > 0


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_nan_in_one_matrix_stays_there(ns_dtype, gen):
    G = _input((4, 12, 20), torch.float32, gen)
    G[2, 3, 5] = float("nan")
    out = mk.orthogonalize(G, ns_dtype=ns_dtype)
    assert torch.isnan(out[2]).all()
    for i in (0, 1, 3):
        assert torch.isfinite(out[i]).all()
        torch.testing.assert_close(out[i], mk.orthogonalize(G[i], ns_dtype=ns_dtype), rtol=0, atol=0)


def test_tiny_gradient_with_eps_zero_is_orthogonalized(gen):
    G = _input((16, 24), torch.float32, gen)
    G = G / G.norm() * 1e-9
    out = mk.orthogonalize(G, eps=0.0, ns_dtype=torch.float32)
    assert rel_err(out, reference_ns(G.double() / G.double().norm())) <= FP32_TOL
    # With the default eps = 1e-7 the same gradient is divided by 1e-7, not by its norm.
    clamped = mk.orthogonalize(G, ns_dtype=torch.float32)
    assert rel_err(clamped, reference_ns(G, eps=1e-7)) <= FP32_TOL
    assert rel_err(clamped, out) > 0.1


@pytest.mark.parametrize("eps", [0.0, 1e-7])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zero_matrix_gives_zeros(eps, ns_dtype):
    out = mk.orthogonalize(torch.zeros(3, 8, 5), eps=eps, ns_dtype=ns_dtype)
    assert torch.count_nonzero(out) == 0 and not torch.isnan(out).any()


def test_non_contiguous_inputs_match_contiguous(gen):
    base = _input((10, 30), torch.float32, gen)
    for view in (base.T, base[:, ::2], base.T[::3]):
        assert not view.is_contiguous()
        torch.testing.assert_close(mk.orthogonalize(view), mk.orthogonalize(view.contiguous()), rtol=0, atol=0)


def test_input_is_not_modified(gen):
    G = _input((2, 9, 4), torch.bfloat16, gen)
    before = G.clone()
    mk.orthogonalize(G)
    assert torch.equal(G, before)


def test_empty_and_bad_inputs():
    assert mk.orthogonalize(torch.zeros(0, 5)).shape == (0, 5)
    with pytest.raises(ValueError, match="at least 2 dims"):
        mk.orthogonalize(torch.ones(5))
    with pytest.raises(ValueError, match="ns_dtype"):
        mk.orthogonalize(torch.ones(3, 3), ns_dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown preset"):
        mk.orthogonalize(torch.ones(3, 3), ns_coefficients="kellerr")
    with pytest.raises(ValueError, match="ns_steps"):
        mk.orthogonalize(torch.ones(3, 3), ns_steps=-1)
    with pytest.raises(ValueError, match="backend"):
        mk.orthogonalize(torch.ones(3, 3), backend="tensorrt")
    with pytest.raises(ValueError, match="triton backend needs a CUDA tensor, got cpu"):
        mk.orthogonalize(torch.ones(3, 3), backend="triton")


def test_a_tensor_that_requires_grad_gives_a_plain_result():
    G = torch.randn(16, 32, requires_grad=True)
    out = mk.orthogonalize(G, ns_dtype=torch.float32)
    assert not out.requires_grad and G.grad is None
    assert torch.equal(out, mk.orthogonalize(G.detach(), ns_dtype=torch.float32))
