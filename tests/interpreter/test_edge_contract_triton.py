"""The edge contract on the Triton kernels (CPU interpreter): extreme gradient scales in both
Newton–Schulz paths, torch's rounding of the EMA weight, torch's lerp branch for negative weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import muon_kernels as mk
from muon_kernels.ns_config import resolve_ns_config
from muon_kernels.triton_kernels.fused_update import _lerp
from muon_kernels.triton_kernels.newton_schulz import newton_schulz, normalize
from muon_kernels.triton_kernels.small_newton_schulz import small_newton_schulz
from oracles import negative_largest_entry, reference_ns, rel_err
import triangle_check

FP32_TOL = 1e-4


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("path", ["symmetric", "small"])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e30])
@pytest.mark.parametrize("shape", [(2, 1, 3), (1, 1, 1), (2, 37, 70)])
def test_extreme_scales_orthogonalize_like_unit_ones(shape, scale, storage, path):
    G = (_randn(*shape) * scale).to(storage)
    config = resolve_ns_config("keller", 5, 0.0)
    run = newton_schulz if path == "symmetric" else small_newton_schulz
    out = run(G, config, torch.float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference_ns(G.double(), eps=0.0)) <= FP32_TOL


@pytest.mark.parametrize("path", ["symmetric", "small"])
@pytest.mark.parametrize("scale", [1e-40, 1e-44, 1e38, "negative"])
@pytest.mark.parametrize("shape", [(2, 7, 5), (3, 24, 10)])
def test_fp32_subnormal_near_overflow_and_negative_largest_entries(shape, scale, path):
    """The torch backend's edge cases (tests/test_edge_contract.py) on the kernels: fp32 subnormals,
    entries near fp32's max (tile scales clamped to 2^126), and a largest magnitude that is a
    negative entry (-1e30 among 1e-30s; a matrix with no positive entry)."""
    G = negative_largest_entry(shape) if scale == "negative" else (_randn(*shape) * scale).float()
    assert torch.isfinite(G).all() and (G != 0).any()
    run = newton_schulz if path == "symmetric" else small_newton_schulz
    out = run(G, resolve_ns_config("keller", 5, 0.0), torch.float32)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference_ns(G.double(), eps=0.0)) <= FP32_TOL


def test_huge_and_tiny_norms_are_exact_to_fp32_rounding():
    config = resolve_ns_config("keller", 0, 0.0)
    for scale in (1e-38, 1e-30, 1.0, 1e30, 1e37):
        G = (_randn(3, 70, 300, seed=1) * scale).float()
        out = normalize(G, config, torch.float32)
        exact = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
        assert rel_err(out, exact) <= 4 * 2.0**-24, scale


def test_tiles_of_subnormals_count_beside_a_tile_of_normal_entries():
    """A 1e-36 entry in the first 16×32 tile, subnormals (|x| < 7e-39) in every other tile: each
    tile's scale is clamped to 2^-126, never 0, so the subnormal tiles' ~0.9% share of ‖G‖² is kept."""
    G = (_randn(2, 40, 70, seed=3) * 2e-39).float()
    G[:, 0, 0] = 1e-36
    assert (G[:, 16:].abs() < torch.finfo(torch.float32).tiny).all()
    out = normalize(G, resolve_ns_config("keller", 0, 0.0), torch.float32)
    exact = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
    assert rel_err(out, exact) <= 4 * 2.0**-24


@pytest.mark.parametrize("path", ["symmetric", "small"])
@pytest.mark.parametrize("scale", [1e40, 1e300])
def test_fp64_stacks_beyond_fp32s_range_orthogonalize(path, scale):
    """fp64 parameters: the fp32 normalization kernels turned entries beyond fp32's range into inf
    and the matrix into NaN (1e40), where the torch backend scales in fp64."""
    G = _randn(2, 37, 70, seed=2) * scale
    config = resolve_ns_config("keller", 5, 0.0)
    run = newton_schulz if path == "symmetric" else small_newton_schulz
    out = run(G, config, torch.float32)
    assert rel_err(out, reference_ns(G / scale, eps=0.0)) <= FP32_TOL
    p = torch.nn.Parameter(torch.zeros(37, 70, dtype=torch.float64))
    p.grad = G[0].clone()
    mk.Muon([p], lr=0.1, weight_decay=0.0, momentum=0.0, eps=0.0, backend="triton", ns_dtype=torch.float32).step()
    assert rel_err(p.detach(), -0.1 * reference_ns(G[0] / scale, eps=0.0)) <= FP32_TOL


def test_public_api_with_eps_zero_and_a_1e_minus_30_gradient():
    out = mk.orthogonalize(torch.randn(1, 3) * 1e-30, eps=0.0, ns_dtype=torch.float32, backend="triton")
    assert torch.isfinite(out).all() and out.abs().max() > 0.1


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("momentum", [0.95, 0.9, 0.37])
def test_fused_ema_momentum_rounds_like_torch_bit_for_bit(momentum, nesterov):
    buffers = {}
    for backend in ("torch", "triton"):
        p = torch.nn.Parameter(torch.zeros(24, 40))
        opt = mk.Muon([p], backend=backend, momentum=momentum, nesterov=nesterov, ns_dtype=torch.float32, ns_steps=1)
        for step in range(3):
            p.grad = torch.ones(24, 40) if step == 0 else _randn(24, 40, seed=step).float()
            opt.step()
        buffers[backend] = opt.state[p]["momentum_buffer"]
    assert torch.equal(buffers["triton"], buffers["torch"])


@triton.jit
def _lerp_kernel(A, B, W, Out, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Out + i, _lerp(tl.load(A + i), tl.load(B + i), tl.load(W + i), EMULATE_RN=True))


def test_lerp_switches_formula_at_absolute_weight_one_half_like_torch():
    """Weights from -2 to 2, and every fourth one exactly ±0.5 (momentum 0.5's EMA weight), where
    torch takes its second formula: the two round apart on some of these inputs."""
    n = 64
    a, b = _randn(n, seed=1).float() * 3, _randn(n, seed=2).float() * 3
    w = torch.linspace(-2.0, 2.0, n)
    w[::4] = torch.tensor([0.5, -0.5]).repeat(n // 8)
    first = (w.double() * (b - a).double() + a.double()).float()  # the formula below |w| = 0.5, one rounding
    assert not torch.equal(first[::4], torch.lerp(a, b, w)[::4])
    out = torch.empty(n)
    _lerp_kernel[(1,)](a, b, w, out, N=n)
    assert torch.equal(out, torch.lerp(a, b, w))


@pytest.mark.parametrize("sqrt_error", [0, -1, 1])
def test_triangle_coordinates_are_exact_at_every_column_boundary(sqrt_error, monkeypatch):
    """The interpreter's sqrt rounds correctly; a GPU's tl.sqrt (sqrt.approx.f32) may be an ulp off
    either way, so the check also runs with the interpreter's sqrt pushed one ulp down and one up:
    each of the kernel's two corrections is then needed (tests/gpu runs it on a GPU's own sqrt)."""
    if sqrt_error:
        from triton.runtime.interpreter import InterpreterBuilder

        towards = np.inf if sqrt_error > 0 else -np.inf

        def off_by_an_ulp(x):
            return np.nextafter(np.sqrt(x), towards).astype(x.dtype)

        monkeypatch.setattr(InterpreterBuilder, "create_sqrt", lambda self, arg: self.unary_op(arg, off_by_an_ulp))
    triangle_check.check(torch.device("cpu"))


@pytest.mark.parametrize("shape", [(2, 24, 40), (2, 40, 130)])  # the small and the symmetric path
def test_nan_filled_work_buffers_change_no_bit(shape, monkeypatch):
    """MUON_KERNELS_DEBUG_FILL=nan poisons every torch.empty work buffer: a kernel that read an
    element nobody wrote would now produce NaN; the results must be bitwise the same."""
    def step_results():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(shape[1:])) for _ in range(shape[0])]
        opt = mk.Muon(ps, backend="triton", ns_dtype=torch.bfloat16, ns_steps=3)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach().clone() for p in ps]

    monkeypatch.delenv("MUON_KERNELS_DEBUG_FILL", raising=False)
    clean = step_results()
    monkeypatch.setenv("MUON_KERNELS_DEBUG_FILL", "nan")
    poisoned = step_results()
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all() and torch.equal(a, b)


@pytest.mark.parametrize("options", [{}, {"momentum_dtype": "int8"}, {"adaptive": "normuon"}])
def test_fused_kernels_write_nothing_past_a_parameters_end(options):
    """Parameters that are views into one storage with sentinels between them (a flat-parameter
    layout): the momentum and update kernels must leave every sentinel as it was — the CPU would not
    fault on a write one element past a tensor, a GPU would not either."""
    shapes, gap = [(24, 40), (40, 24), (3, 256)], 37
    sizes = [r * c for r, c in shapes]
    storage = torch.full((sum(sizes) + gap * (len(sizes) + 1),), 12345.0)
    params, offset = [], gap
    for shape, size in zip(shapes, sizes):
        params.append(torch.nn.Parameter(storage[offset:offset + size].view(shape)))
        offset += size + gap
    opt = mk.Muon(params, lr=0.05, backend="triton", ns_dtype=torch.float32, ns_steps=1, **options)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    sentinels = torch.ones_like(storage, dtype=torch.bool)
    offset = gap
    for size in sizes:
        sentinels[offset:offset + size] = False
        offset += size + gap
    assert bool((storage[sentinels] == 12345.0).all()) and not bool((storage[~sentinels] == 12345.0).any())
