"""Optimizer variants on a real GPU (marked ``gpu``; skipped without one), every kernel backend
against the torch backend on the same device: cautious weight decay; NorMuon and the hyperball
(statistics kernel + fused update); split pieces; low-precision momentum (int8 and stochastically
rounded bf16 must store the same bits as the torch reference, and int8 keeps 127 where a draw
rounds to 128); and a CUDA-graph replay of a step with all of them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import muon_kernels as mk
from muon_kernels import momentum_precision
from muon_kernels.backends import available_backends

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cautious_compare  # noqa: E402
import non_finite_momentum  # noqa: E402
import stochastic_draws  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cautious_weight_decay_matches_torch_backend(backend, dtype):
    """Three cautious steps against the torch backend (tests/cautious_compare.py): equal to the
    backends' rounding wherever both backends' masks agree, at most the decay apart where an O entry
    within rounding of zero flipped the mask, and such flips rare. (The first H200 run's global
    1e-5 check saw a 0.0176 gap in norm: lr·wd = 2.5% of one |W| ≈ 0.7, about one entry of 786k.)"""
    ok, why = available_backends(DEV)[backend]
    assert ok, f"backend {backend} unavailable on this GPU: {why}"
    result = cautious_compare.run_pair(backend, [(256, 1024), (1024, 256), (256, 1024)], dtype, DEV)
    cautious_compare.check(result, tol=1e-5 if dtype == torch.float32 else 2.0**-7)


def _pair(backend, shapes, dtype, options, groups=None):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device=DEV).to(dtype)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    make = groups or (lambda params: params)
    opts = [mk.Muon(make(x), lr=0.05, ns_dtype=torch.float32, backend=b, **options)
            for x, b in ((ps, backend), (twins, "torch"))]
    return ps, twins, opts


def _steps(ps, twins, opts, shapes, dtype, steps=3):
    for _ in range(steps):
        grads = [torch.randn(s, device=DEV).to(dtype) for s in shapes]
        for group, opt in zip((ps, twins), opts):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("options", [{"adaptive": "normuon"}, {"constraint": "hyperball", "weight_decay": 0.0},
                                     {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0}])
def test_normuon_and_hyperball_match_torch_backend(backend, options):
    shapes = [(256, 1024), (1024, 256), (4, 256, 1024)]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "matrix_view": "batch"}]  # noqa: E731
    ps, twins, opts = _pair(backend, shapes, torch.float32, options, groups)
    _steps(ps, twins, opts, shapes, torch.float32)
    assert all(b.backend.NAME == backend for b in opts[0]._buckets)
    for p, q in zip(ps, twins):
        assert ((p - q).norm() / q.norm()).item() <= 1e-5
        for key in ("normuon_v", "hyperball_radius"):
            if key in opts[1].state[q]:
                assert ((opts[0].state[p][key] - opts[1].state[q][key]).norm() / opts[1].state[q][key].norm()) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_split_pieces_match_torch_backend(backend, monkeypatch):
    """Row pieces (contiguous) and column pieces of a weight stored (in, out) (strided rows), all in
    the fused kernels: the torch path is trapped for the kernel backend."""
    from muon_kernels.backends import torch_backend

    shapes = [(3 * 512, 512), (512, 3 * 512), (512, 512)]
    groups = lambda ps: [{"params": ps[:1], "split_sizes": (512, 512, 512)},  # noqa: E731
                         {"params": ps[1:2], "split_sizes": (512, 512, 512), "matrix_view": "transposed"},
                         {"params": ps[2:]}]
    ps, twins, opts = _pair(backend, shapes, torch.float32, {}, groups)
    for _ in range(3):
        grads = [torch.randn(s, device=DEV) for s in shapes]
        for p, q, g in zip(ps, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opts[1].step()
        with monkeypatch.context() as m:
            m.setattr(torch_backend, "momentum_stack", None)  # a fallback would call None and fail
            m.setattr(torch_backend, "apply_update", None)
            opts[0].step()
    [bucket] = opts[0]._buckets
    assert bucket.matrices == 7 and bucket.backend.NAME == backend
    for p, q in zip(ps, twins):
        assert ((p - q).norm() / q.norm()).item() <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("options", [{"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"},
                                     {"momentum_dtype": "int8"},
                                     {"momentum_dtype": "int8", "momentum_rounding": "stochastic"},
                                     # SGD's μ·M + G: rounded twice in the reference, no FMA in the kernels
                                     {"momentum_dtype": "int8", "momentum_form": "sgd"},
                                     {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic",
                                      "momentum_form": "sgd"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["partial", "whole"])
def test_low_precision_momentum_stores_the_reference_bits(backend, options, dtype, blocks):
    """Three steps against the torch backend on the device, every state tensor bit for bit. Rows of
    whole int8 blocks are quantized in the kernels' registers (the fused path; its block scales are
    max|m| · fl32(1/127) as the reference's: a GPU's torch divides by a number as a product by its
    reciprocal); rows with a partial last block take the torch path inside the kernel backend."""
    shapes = ([(512, 768), (768, 512)] if blocks == "whole"
              else [(256, 1000), (1000, 256), (300, 7)])  # numels not multiples of 256: partial last blocks
    ps, twins, opts = _pair(backend, shapes, dtype, options)
    _steps(ps, twins, opts, shapes, dtype)
    fused = [momentum_precision.kernel_blocks(b) for b in opts[0]._buckets]
    assert fused == [blocks == "whole"] * len(fused) and fused, fused
    for p, q in zip(ps, twins):
        for key, value in opts[1].state[q].items():
            assert torch.equal(opts[0].state[p][key], value), key


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("options", [{}, {"momentum_rounding": "stochastic"}])
def test_int8_momentum_of_a_non_finite_gradient_stores_the_reference_bits(backend, value, options):
    """tests/non_finite_momentum.py on the GPU, where ``max.f32`` drops a NaN: the kernels' block
    maximum and clamp keep the torch backend's bits (a NaN block's scale NaN, the NaN stored as 0),
    and torch's own CUDA float → int8 conversion stores a NaN as 0, as the CPU's does."""
    ok, why = available_backends(DEV)[backend]
    assert ok, f"backend {backend} unavailable on this GPU: {why}"
    reference = non_finite_momentum.steps("torch", DEV, value, options)
    non_finite_momentum.assert_same_bits(non_finite_momentum.steps(backend, DEV, value, options), reference)
    assert not torch.full((1024,), float("nan"), device=DEV).to(torch.int8).any()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_stochastic_int8_stores_127_where_the_draw_rounds_to_128(backend, monkeypatch):
    """tests/stochastic_draws.py's edge: 127 + (1 - 2^-24) is 128 in fp32; stored as 127, like the
    torch backend (tests/interpreter/test_momentum_precision_triton.py), not wrapped to -128."""
    p, opt, _, _ = stochastic_draws.int8_at_the_top(backend, DEV, monkeypatch)
    assert opt._buckets[0].backend.NAME == backend
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.full((2, 512), 127, dtype=torch.int8, device=DEV))
    assert torch.equal(opt.state[p]["momentum_scale"], torch.full((2, 2), 1 / 128, device=DEV))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_of_a_step_with_every_variant(backend):
    shapes = [(256, 512), (3 * 128, 256)]
    options = {"adaptive": "normuon", "momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic",
               "weight_decay_mode": "cautious", "capturable": True}
    lr = torch.tensor(0.05, device=DEV)
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "split_sizes": (128, 128, 128)}]  # noqa: E731
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device=DEV)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    graph_opt = mk.Muon(groups(ps), lr=lr, backend=backend, **options)
    eager_opt = mk.Muon(groups(twins), lr=lr, backend=backend, **options)
    grads = [[torch.randn(s, device=DEV) for s in shapes] for _ in range(4)]
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    graph_opt.step()  # warm-up: state, address tables
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for p, g in zip(twins, grads[0]):
        p.grad = g.clone()
    eager_opt.step()
    for step_grads in grads[1:]:
        for p, q, g in zip(ps, twins, step_grads):
            p.grad.copy_(g)
            q.grad = g.clone()
        graph.replay()
        eager_opt.step()
    for p, q in zip(ps, twins):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
