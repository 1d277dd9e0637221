"""Low-precision momentum in the fused Triton momentum kernel (CPU interpreter) against the torch
reference: the same hash, the same fp32 arithmetic, so the stored momentum (int8 values and block
scales, or stochastically rounded bf16) and the parameters after a few steps agree bit for bit."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from muon_kernels import momentum_precision, random_bits
import non_finite_momentum
import stochastic_draws

# Rows a multiple of 256 long (the fused int8 path: blocks tile the flat buffer), and (7, 300), whose
# rows end in a partial block (the torch path quantizes it; the bf16 path stays fused).
SHAPES = [(2, 512), (3, 2, 256), (4, 256), (7, 300)]


def _run(backend: str, options: dict, dtype=torch.float32, form="ema"):
    g = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    groups = [{"params": [p], **({"matrix_view": "batch"} if p.ndim == 3 else {})} for p in ps]
    opt = mk.Muon(groups, lr=0.05, backend=backend, ns_dtype=torch.float32, ns_steps=1, momentum_form=form,
                  **options)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("options", [{"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"},
                                     {"momentum_dtype": "int8"},
                                     {"momentum_dtype": "int8", "momentum_rounding": "stochastic"}])
@pytest.mark.parametrize("form", ["ema", "sgd"])
def test_fused_low_precision_momentum_matches_the_reference_bitwise(options, form):
    ref, ref_opt = _run("torch", options, form=form)
    out, opt = _run("triton", options, form=form)
    assert all(b.backend.NAME == "triton" for b in opt._buckets)
    fused_int8 = [momentum_precision.kernel_blocks(b) for b in opt._buckets]
    assert fused_int8 == [True, True, True, False]  # bucket order follows SHAPES
    for a, b in zip(ref, out):
        for key, value in ref_opt.state[a].items():
            assert torch.equal(opt.state[b][key], value), key
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-6)


def test_int8_block_scales_are_max_times_the_fp32_reciprocal_of_127():
    """The fused kernel's block scales are max|m| · fl32(1/127), as the reference's: a GPU's torch
    divides by a number as a product by its reciprocal, so every backend multiplies. The data holds
    blocks where a division would round otherwise (checked), so a kernel that divided fails here."""
    g = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.zeros(64, 1024))
    grad = torch.randn(p.shape, generator=g)
    opt = mk.Muon([p], lr=0.05, momentum=0.95, backend="triton", ns_dtype=torch.float32, ns_steps=1,
                  momentum_dtype="int8")
    p.grad = grad
    opt.step()
    assert momentum_precision.kernel_blocks(opt._buckets[0])
    m = torch.lerp(torch.zeros_like(grad), grad, 0.05)  # the first step's momentum, from zero
    largest = m.abs().view(64, 4, 256).amax(dim=2)
    product = largest * torch.tensor(1 / 127, dtype=torch.float32)
    assert (product != largest / 127).any()  # the data tells a product from a division (3 of 256 blocks)
    assert torch.equal(opt.state[p]["momentum_scale"], product)


def test_nearest_bf16_momentum_of_fp32_parameters_rounds_the_gradient_first():
    """bf16 momentum (nearest) of fp32 parameters takes the fused kernel's plain path: the fp32
    gradient is rounded to bf16 before the lerp, as the torch backend rounds it."""
    options = {"momentum_dtype": torch.bfloat16}
    ref, ref_opt = _run("torch", options)
    out, opt = _run("triton", options)
    assert all(b.backend.NAME == "triton" for b in opt._buckets)
    for a, b in zip(ref, out):
        assert opt.state[b]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.equal(opt.state[b]["momentum_buffer"], ref_opt.state[a]["momentum_buffer"])
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-6)


def test_bf16_parameters_with_int8_momentum():
    ref, ref_opt = _run("torch", {"momentum_dtype": "int8"}, dtype=torch.bfloat16)
    out, opt = _run("triton", {"momentum_dtype": "int8"}, dtype=torch.bfloat16)
    for a, b in zip(ref, out):
        assert torch.equal(opt.state[b]["momentum_buffer"], ref_opt.state[a]["momentum_buffer"])
        assert torch.equal(opt.state[b]["momentum_scale"], ref_opt.state[a]["momentum_scale"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_bf16_momentum_keeps_a_nan_whose_payload_would_carry_into_the_sign(backend):
    """A NaN with every mantissa bit set (0x7FFFFFFF: what a GPU's fp32 arithmetic makes) plus the
    random low bits overflows into 0x8000xxxx, -0.0: the stored momentum must stay NaN there, like
    torch's own rounding of a NaN, and every other element must be unaffected."""
    p = torch.nn.Parameter(torch.zeros(2, 512))
    opt = mk.Muon([p], lr=0.05, backend=backend, ns_dtype=torch.float32, ns_steps=1, momentum_form="sgd",
                  momentum_dtype=torch.bfloat16, momentum_rounding="stochastic")
    grad = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    grad.view(torch.int32)[1, 7] = 0x7FFFFFFF
    p.grad = grad
    opt.step()
    buf = opt.state[p]["momentum_buffer"].float()
    assert torch.isnan(buf[1, 7]) and torch.isnan(buf).sum() == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("options", [{}, {"momentum_rounding": "stochastic"}, {"momentum_form": "sgd"}])
def test_int8_momentum_of_a_non_finite_gradient_stores_the_reference_bits(value, options):
    """A NaN or an infinity in one block (tests/non_finite_momentum.py): the kernel's block maximum
    keeps the NaN (``tl.max`` drops it) and stores the NaN as 0 (the clamp alone made it -127), as
    the torch reference does, at that step and the next."""
    reference = non_finite_momentum.steps("torch", "cpu", value, options)
    non_finite_momentum.assert_same_bits(non_finite_momentum.steps("triton", "cpu", value, options), reference)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stochastic_int8_stores_127_where_the_draw_rounds_to_128(backend, monkeypatch):
    """Every element at 127 levels of its block and one drawing the largest fraction: 127 + (1 - 2^-24)
    is 128 in fp32; it is stored as 127 (not wrapped to int8's -128), the step's U and the parameter
    too, and the seed really drew those bits."""
    p, opt, seed, index = stochastic_draws.int8_at_the_top(backend, "cpu", monkeypatch)
    assert torch.tensor(127.0) + (2**24 - 1) * 2.0**-24 == 128.0
    assert int(random_bits.random_bits(seed, torch.tensor(1), 1024, "cpu")[index]) >> 8 == 2**24 - 1
    assert opt._buckets[0].backend.NAME == backend
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.full((2, 512), 127, dtype=torch.int8))
    assert torch.equal(opt.state[p]["momentum_scale"], torch.full((2, 2), 1 / 128))
    assert torch.isfinite(p).all() and bool((p < 0).all())  # U: 127/128 everywhere, one sign
    assert torch.equal(p[0, index], p[0, index + 1])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_int8_blocks_of_zeros_store_zero_values_and_scales(rounding):
    """Half a matrix of zero gradients (whole 256-element blocks, their momentum still zero): those
    blocks store scale 0 and int8 zeros, exactly as the reference does, not 0/0 cast to int8."""
    state = {}
    for backend in ("torch", "triton"):
        p = torch.nn.Parameter(torch.randn(2, 512, generator=torch.Generator().manual_seed(3)))
        opt = mk.Muon([p], lr=0.05, backend=backend, ns_dtype=torch.float32, ns_steps=1, momentum_dtype="int8",
                      momentum_rounding=rounding)
        grad = torch.randn(2, 512, generator=torch.Generator().manual_seed(4))
        grad[1] = 0.0
        p.grad = grad
        opt.step()
        assert opt._buckets[0].backend.NAME == backend
        state[backend] = (opt.state[p]["momentum_buffer"], opt.state[p]["momentum_scale"])
    buf, scale = state["triton"]
    assert torch.equal(buf, state["torch"][0]) and torch.equal(scale, state["torch"][1])
    assert not buf.view(-1)[512:].any() and not scale.view(-1)[2:].any() and scale.view(-1)[:2].all()
