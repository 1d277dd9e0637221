"""Gram Newton–Schulz and AOL on the Triton kernels (CPU interpreter): against the fp64 recurrence
(with AOL written from the Turbo-Muon source) and against the torch backend's same algorithm."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import torch_backend, triton_backend
from muon_kernels.ns_config import resolve_ns_config
from oracles import plain_recurrence, reference_ns, rel_err, scalar_map

FP32_TOL = 1e-4  # DESIGN.md §5, any kernel under the interpreter with fp32 operands


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


@pytest.mark.parametrize("shape", [(2, 20, 70), (1, 40, 33), (1, 1, 9)])
@pytest.mark.parametrize("algorithm, preset", [("gram", "keller"), ("gram", "polar_express"), ("standard", "turbo"),
                                               ("gram", "turbo")])
def test_fp32_matches_fp64_recurrence(shape, algorithm, preset):
    G = _randn(*shape)  # (1, 40, 33) is tall: iterated as its transpose, AOL scaling its columns
    out = mk.orthogonalize(G, ns_coefficients=preset, ns_dtype=torch.float32, ns_algorithm=algorithm, backend="triton")
    assert rel_err(out, reference_ns(G, preset)) <= FP32_TOL
    config = resolve_ns_config(preset, None, 1e-7, algorithm)
    assert triton_backend.kernel_path(min(shape[1:]), max(shape[1:]), torch.float32, G.device, config)[0] != "small"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_gram_within_torchs_error(dtype):
    G = _randn(2, 24, 96, seed=1)
    ref = reference_ns(G, "keller")
    bound = 2 * rel_err(plain_recurrence(G, dtype), ref) + 1e-2
    for config in (resolve_ns_config("keller", None, 1e-7, "gram"), resolve_ns_config("turbo", None, 1e-7)):
        out = triton_backend.orthogonalize(G, config, dtype)
        assert out.dtype == dtype
        torch_out = torch_backend.orthogonalize(G, config, dtype)
        assert rel_err(out, torch_out) <= bound
    assert rel_err(triton_backend.orthogonalize(G, resolve_ns_config("keller", None, 1e-7, "gram"), dtype), ref) <= bound


def test_scalar_map_through_gram_and_aol():
    for preset in ("keller", "turbo"):
        D, expected = scalar_map(preset)
        wide = torch.cat([D, torch.zeros(D.shape[0], 3)], dim=1)[None]
        out = triton_backend.orthogonalize(wide, resolve_ns_config(preset, None, 1e-7, "gram"), torch.float32)[0]
        torch.testing.assert_close(torch.diagonal(out).double(), expected, atol=2e-5, rtol=0)


def test_optimizer_step_on_triton_matches_torch_backend():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(12, 40)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [mk.Muon(ps, lr=0.02, ns_dtype=torch.float32, ns_algorithm="gram", ns_normalization="aol", backend=b)
            for ps, b in ((params, "triton"), (twins, "torch"))]
    assert "symmetric-gram" in str(opts[0].plan())
    for _ in range(2):
        grads = [torch.randn(12, 40) for _ in params]
        for ps, opt in zip((params, twins), opts):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
