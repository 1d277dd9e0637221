"""The Triton kernels on the CPU interpreter, against fp64 and the torch reference (DESIGN.md §5).

Shapes are small (the interpreter runs one program at a time) but cover m = 1, n = 1, primes,
sizes that are not multiples of the 32-wide interpreter tiles, tall and wide, batched, strided.
"""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import torch_backend, triton_backend
from muon_kernels.ns_config import resolve_ns_config
from muon_kernels.triton_kernels.config import INTERPRETER_CONFIG
from muon_kernels.triton_kernels.newton_schulz import newton_schulz, normalize, ns_update
from muon_kernels.triton_kernels.small_newton_schulz import fits, small_newton_schulz
from muon_kernels.triton_kernels.symmetric_matmul import symmetric_matmul
from oracles import plain_recurrence, reference_ns, rel_err, scalar_map

FP32_TOL = 1e-4
# A 16-bit output is the fp32 result rounded once: half an ulp of bf16 / fp16 relative.
ROUNDING = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 9), (2, 40, 33), (1, 70, 5), (3, 100, 64)])
def test_symmetric_matmul_x_xt(shape, dtype):
    X = _randn(*shape, dtype=dtype)
    out = symmetric_matmul(X)
    exact = X.double() @ X.double().mT
    assert out.dtype == dtype
    assert rel_err(out, exact) <= 2 * ROUNDING[dtype]
    # Mirrored off-diagonal tiles hold exactly the values of the tile they mirror (interpreter tiles
    # are 32 wide); diagonal tiles are symmetric up to the accumulation order of the dot.
    tile = INTERPRETER_CONFIG.block_m
    assert torch.equal(out[:, :tile, tile:], out[:, tile:, :tile].mT)
    assert rel_err(out, out.mT) <= 2 * ROUNDING[dtype]


def test_symmetric_matmul_xt_x_of_a_tall_view_makes_no_copy():
    X = _randn(2, 45, 37)
    out = symmetric_matmul(X.mT)  # XᵀX through strides
    assert rel_err(out, X.double().mT @ X.double()) <= 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_matmul_fused_epilogue(dtype):
    X = _randn(2, 50, 50)
    A = (X @ X.mT / 50).to(dtype)
    out = symmetric_matmul(A, alpha=2.0315, D=A, beta=-4.7750)
    Ad = A.double()
    exact = 2.0315 * Ad @ Ad - 4.7750 * Ad
    assert rel_err(out, exact) <= 4 * ROUNDING[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n", [(1, 7), (33, 70), (40, 40)])
def test_ns_update(m, n, dtype):
    B, X = _randn(2, m, m, dtype=dtype, seed=1), _randn(2, m, n, dtype=dtype, seed=2)
    out = ns_update(B, X, 3.4445)
    exact = 3.4445 * X.double() + B.double() @ X.double()
    assert rel_err(out, exact) <= 4 * ROUNDING[dtype]


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["keller", "polar_express"])
def test_normalize_matches_reference(preset, ns_dtype):
    G = _randn(3, 21, 77, dtype=torch.bfloat16)
    config = resolve_ns_config(preset, 5, 1e-7)
    out = normalize(G.mT, config, ns_dtype)  # a transposed view: read through strides
    ref = torch_backend.normalize(G.mT, config, ns_dtype)
    assert out.is_contiguous() and out.shape == (3, 77, 21)
    assert rel_err(out, ref) <= 2 * ROUNDING[ns_dtype]


def test_normalize_isolates_nan_and_handles_zero_and_tiny():
    G = _randn(4, 10, 30)
    G[1, 2, 3] = float("nan")
    G[2] = 0.0
    G[3] = G[3] / G[3].norm() * 1e-9
    out = normalize(G, resolve_ns_config("keller", 5, 0.0), torch.float32)
    assert torch.isnan(out[1]).all()
    assert torch.count_nonzero(out[2]) == 0 and not torch.isnan(out[2]).any()
    assert abs(out[3].double().norm().item() - 1.0) < 1e-5
    assert abs(out[0].double().norm().item() - 1.0) < 1e-5


@pytest.mark.parametrize("preset", ["keller", "polar_express"])
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_normalize_divides_by_the_formulas_divisor_at_tiny_norms(preset, eps):
    """X = G / max(‖G‖·scale + offset, eps) in fp64 (polar_express: scale 1.02, offset 1e-6), at norms
    where the offset or the eps floor decides: the kernels pre-scale G by a power of two, so both must
    be scaled with it."""
    config = resolve_ns_config(preset, None, eps)
    worst = 0.0
    for size in (1e-9, 1e-7, 3e-7, 1e-5, 1.0):
        G = torch.randn(3, 20, 45, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * size
        out = normalize(G.float(), config, torch.float32).double()
        ref = torch.stack([M / max(M.norm().item() * config.norm_scale + config.norm_offset, eps) for M in G.float().double()])
        worst = max(worst, rel_err(out, ref))
    assert worst <= 1e-6, worst


def test_fp16_normalize_is_the_fp64_quotient_rounded_once():
    """fp16 output: the fp64 quotient rounded once to fp16 (the interpreter rounds fp16 stores to
    nearest; its bf16 stores truncate, so bf16 is checked on a GPU): a cast before the divide
    would round twice and differ in about a quarter of the elements."""
    G = torch.randn(3, 40, 70, generator=torch.Generator().manual_seed(0))
    out = normalize(G, resolve_ns_config("keller", None, 1e-7), torch.float16)
    ref = torch.stack([(M.double() / M.double().norm()).to(torch.float16) for M in G])
    assert (out != ref).double().mean().item() <= 1e-3


def test_each_matrix_is_reduced_once_in_a_fixed_order_at_counters_left_at_zero(monkeypatch):
    """The last tile of a matrix to finish reduces its partials (here in several masked rounds of two)
    into the norm every scale-and-cast program reads; a matrix whose tiles span 2^100 in scale keeps
    its small tiles; the counters it counted at are zero again, so the next call reduces too."""
    from muon_kernels import workspace
    from muon_kernels.triton_kernels import newton_schulz as ns_module

    monkeypatch.setattr(ns_module, "_PARTIALS_BLOCK", 2)
    G = _randn(3, 50, 70)  # 4 × 3 interpreter tiles per matrix
    G[1, :16, :32] *= 2.0**50
    G[1, 16:, 32:] *= 2.0**-50
    config = resolve_ns_config("keller", 5, 1e-7)
    out = normalize(G, config, torch.float32)
    exact = G.double() / G.double().norm(dim=(1, 2), keepdim=True)
    assert rel_err(out, exact) <= 2 * ROUNDING[torch.float32]
    assert rel_err(out[1, 16:, 32:], exact[1, 16:, 32:]) <= 2 * ROUNDING[torch.float32]
    assert not any(c.any() for c in workspace.COUNTERS.by_stream.values())
    assert torch.equal(normalize(G, config, torch.float32), out)


@pytest.mark.parametrize("preset", ["keller", "quintic", "polar_express"])
def test_fp32_newton_schulz_matches_fp64_recurrence(preset):
    G = _randn(3, 24, 53)
    out = newton_schulz(G, resolve_ns_config(preset, 5, 1e-7), torch.float32)
    assert rel_err(out, reference_ns(G, preset)) <= FP32_TOL


@pytest.mark.parametrize("shape", [(1, 1, 9), (1, 1, 12), (2, 7, 13), (1, 33, 33)])
def test_fp32_odd_shapes(shape):
    G = _randn(*shape)
    out = newton_schulz(G, resolve_ns_config("keller", 3, 1e-7), torch.float32)
    assert rel_err(out, reference_ns(G, "keller", 3)) <= FP32_TOL


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 17, 40), (1, 1, 30)])
def test_low_precision_within_baseline_error(shape, ns_dtype):
    G = _randn(*shape)
    ref = reference_ns(G)
    out = newton_schulz(G, resolve_ns_config("keller", 5, 1e-7), ns_dtype)
    assert rel_err(out, ref) <= 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2


@pytest.mark.parametrize("preset", ["keller", "quintic", "polar_express"])
@pytest.mark.parametrize("path", ["symmetric", "small"])
def test_scalar_map_on_diagonal_input(preset, path):
    D, expected = scalar_map(preset)
    fn = newton_schulz if path == "symmetric" else small_newton_schulz
    out = fn(D[None], resolve_ns_config(preset, 5, 1e-7), torch.float32)[0]
    assert torch.count_nonzero(out - torch.diag(out.diagonal())) == 0
    torch.testing.assert_close(out.diagonal().double(), expected, rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_cublas_path_is_the_normalization_kernels_then_batched_gemms(ns_dtype, algorithm):
    """The "cublas" path: the Triton normalization, then exactly the torch backend's products (the
    same batched GEMMs on the same normalized stack give the same bits), inside the same band."""
    G = _randn(2, 24, 60)
    config = resolve_ns_config("keller", 5, 1e-7, algorithm)
    out = triton_backend.orthogonalize(G, config, ns_dtype, path="cublas")
    from muon_kernels import recurrence
    expected = recurrence.run(normalize(G, config, ns_dtype), config, ns_dtype, torch_backend.MATMUL_OPS)
    assert torch.equal(out, expected)
    if algorithm == "standard":  # (Gram's own accuracy is tests/test_ns_algorithms.py's)
        ref = reference_ns(G)
        bound = FP32_TOL if ns_dtype == torch.float32 else 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2
        assert rel_err(out, ref) <= bound, ns_dtype
    assert triton_backend.kernel_path(24, 60, ns_dtype, G.device, config, "cublas")[0] == "cublas"
    # Offered on a GPU only (for the measuring mode to time); never this backend's own first choice.
    gpu = torch.device("cuda")
    assert triton_backend.paths(4096, 4096, ns_dtype, gpu, config) == ("symmetric", "cublas", "symmetric-cublas")
    assert triton_backend.paths(4096, 4096, ns_dtype, G.device, config) == ("symmetric",)


@pytest.mark.parametrize("normalization", ["frobenius", "aol"])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_symmetric_cublas_path_mixes_the_symmetric_products_with_a_batched_gemm(ns_dtype, normalization):
    """The "symmetric-cublas" path: the Triton normalization, X·Xᵀ and b·A + c·A·A on the symmetric
    kernel, a·X + B·X as the torch backend's batched GEMM — the same bits as running the recurrence
    over exactly those products — and inside the band of the fp64 polar factor."""
    from muon_kernels import recurrence
    from muon_kernels.triton_kernels.symmetric_matmul import symmetric_matmul

    G = _randn(2, 40, 72)
    config = resolve_ns_config("keller", 5, 1e-7, ns_normalization=normalization)
    out = triton_backend.orthogonalize(G, config, ns_dtype, path="symmetric-cublas")
    ops = recurrence.MatmulOps(gram=lambda X: symmetric_matmul(X),
                               poly=lambda A, b, c: symmetric_matmul(A, alpha=c, D=A, beta=b),
                               apply=lambda B, X, a: torch.baddbmm(X, B, X, beta=a))
    assert torch.equal(out, recurrence.run(normalize(G, config, ns_dtype), config, ns_dtype, ops))
    if normalization == "frobenius":
        ref = reference_ns(G)
        bound = FP32_TOL if ns_dtype == torch.float32 else 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2
        assert rel_err(out, ref) <= bound
    assert triton_backend.kernel_path(40, 72, ns_dtype, G.device, config, "symmetric-cublas")[0] == "symmetric-cublas"


def test_symmetric_cublas_path_runs_gram_ns_with_cublas_q_x():
    """Gram NS on the "symmetric-cublas" path: the Gram driver's m×m products on the symmetric kernel,
    its Q·X (restart and result) on torch.bmm — the Triton Gram path's math in another summation
    order (fp32: within 1e-5 of it), and inside the fp64 polar factor's band."""
    G = _randn(2, 24, 96)
    config = resolve_ns_config("keller", 5, 1e-7, "gram", ns_gram_restarts=(2,))
    out = triton_backend.orthogonalize(G, config, torch.float32, path="symmetric-cublas")
    assert rel_err(out, triton_backend.orthogonalize(G, config, torch.float32, path="symmetric")) <= 1e-5
    assert rel_err(out, reference_ns(G)) <= FP32_TOL


def test_nan_member_does_not_leak():
    G = _randn(3, 12, 20)
    G[1, 0, 0] = float("nan")
    config = resolve_ns_config("keller", 2, 1e-7)
    out = newton_schulz(G, config, torch.float32)
    assert torch.isnan(out[1]).all()
    for i in (0, 2):
        torch.testing.assert_close(out[i], newton_schulz(G[i : i + 1], config, torch.float32)[0], rtol=0, atol=0)


def test_backend_through_the_public_api():
    assert mk.available_backends("cpu")["triton"][0]
    G = _randn(2, 30, 12)  # tall: oriented by orthogonalize() as a transposed view
    out = mk.orthogonalize(G, backend="triton", ns_dtype=torch.float32, ns_steps=2)
    assert rel_err(out, reference_ns(G, "keller", 2)) <= FP32_TOL
    cpu = torch.device("cpu")
    assert triton_backend.kernel_path(12, 30, torch.bfloat16, cpu)[0] == "small"
    assert triton_backend.kernel_path(200, 300, torch.bfloat16, cpu)[0] == "symmetric"


def test_optimizer_step_on_the_triton_backend_matches_torch():
    torch.manual_seed(0)
    shapes = [(20, 12), (12, 20), (16, 16)]
    a = [torch.nn.Parameter(torch.randn(s) * 0.2) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = mk.Muon(a, lr=0.05, backend="triton", ns_dtype=torch.float32, ns_steps=3)
    opt_b = mk.Muon(b, lr=0.05, backend="torch", ns_dtype=torch.float32, ns_steps=3)
    assert {r.backend for r in opt_a.plan()} == {"triton"}
    for _ in range(2):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _bucket_params(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(12, 20), (20, 12), (3, 12, 20), (12, 20)]  # a tall one and a batch view share the bucket
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.2).to(dtype)) for s in shapes]


@pytest.mark.parametrize("form", ["ema", "sgd"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype, momentum_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                   (torch.float16, None), (torch.bfloat16, torch.float32)])
def test_fused_momentum_and_update_match_the_torch_path(form, nesterov, dtype, momentum_dtype):
    """Two groups with different momentum/lr/decay in one bucket; fused kernels vs foreach ops."""
    results = {}
    for backend in ("torch", "triton"):
        ps = _bucket_params(dtype, seed=3)
        groups = [
            {"params": ps[:2], "use_muon": True, "momentum": 0.9, "lr": 0.05},
            {"params": ps[2:], "use_muon": True, "matrix_view": "batch", "momentum": 0.8, "weight_decay": 0.3},
        ]
        opt = mk.Muon(groups, backend=backend, ns_dtype=torch.float32, ns_steps=1, nesterov=nesterov,
                      momentum_form=form, momentum_dtype=momentum_dtype)
        assert len(opt._plan_buckets([(i, g, g["params"]) for i, g in enumerate(opt.param_groups)])[0]) == 1
        g = torch.Generator().manual_seed(4)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        results[backend] = (ps, [opt.state[p]["momentum_buffer"] for p in ps])
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for p, q in zip(results["torch"][0], results["triton"][0]):
        assert rel_err(q, p) <= tol
    for a, b in zip(results["torch"][1], results["triton"][1]):
        assert a.dtype == b.dtype == (momentum_dtype or dtype)
        assert rel_err(b, a) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_update_of_16_bit_weights_is_torchs_two_ops_bit_for_bit(dtype):
    """torch.optim.Muon on a GPU: ``p.mul_(1 - lr·wd)`` (rounded to the weight's dtype), then
    ``p.add_(O.to(dtype), alpha=-lr·scale)`` (O cast first, fp32 math, one rounding). The fused kernel
    must give those bits: a missed rounding of W·decay or of O changes hundreds of elements."""
    g = torch.Generator().manual_seed(8)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(12, 20), (20, 12)]]
    opt = mk.Muon(ps, lr=0.1, weight_decay=0.5, backend="triton", ns_dtype=torch.float32)
    [bucket], _ = opt._plan_buckets([(0, opt.param_groups[0], ps)])
    ortho = torch.randn(bucket.matrices, bucket.m, bucket.n, generator=g)
    before = [p.detach().clone() for p in ps]
    with torch.no_grad():
        bucket.backend.apply_update(bucket, ortho, opt.param_groups, opt.state)
    decay, checked = torch.tensor(1 - 0.1 * 0.5, dtype=torch.float32), 0
    for i, (entry, w) in enumerate(zip(bucket.entries, before)):
        o = (ortho[i].mT if entry.view.transposed else ortho[i]).to(dtype).float()
        alpha = torch.tensor(-0.1 * entry.scale, dtype=torch.float32)
        added = ((w.float() * decay).to(dtype).double() + alpha.double() * o.double()).float()  # one rounding
        assert torch.equal(entry.param.detach(), added.to(dtype))
        checked += 1
    assert checked == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_sgd_momentum_buffers_are_torch_sgds_bit_for_bit(dtype):
    """momentum_form="sgd" keeps torch.optim.SGD's buffer: ``buf.mul_(μ).add_(g)``, two roundings
    (fp32 too: the kernel is compiled without multiply-add contraction, tests/test_triton_aot.py)."""
    p = torch.nn.Parameter(torch.zeros(24, 40, dtype=dtype))
    q = torch.nn.Parameter(torch.zeros(24, 40, dtype=dtype))
    opt = mk.Muon([p], backend="triton", momentum=0.9, momentum_form="sgd", nesterov=False, ns_dtype=torch.float32,
                  ns_steps=1)
    sgd = torch.optim.SGD([q], lr=0.0, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        p.grad = (torch.randn(24, 40, generator=g) * 3).to(dtype)
        q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])


@pytest.mark.parametrize("kind", ["channels_last", "fp64"])
def test_fused_path_falls_back_for_non_contiguous_or_fp64_parameters(kind):
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64 if kind == "fp64" else torch.float32)
    g = torch.randn_like(w)
    if kind == "channels_last":
        w, g = w.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    param, ref = torch.nn.Parameter(w), torch.nn.Parameter(w.detach().clone().contiguous())
    a = mk.Muon([param], backend="triton", ns_dtype=torch.float32, ns_steps=2)
    b = mk.Muon([ref], backend="torch", ns_dtype=torch.float32, ns_steps=2)
    param.grad, ref.grad = g, g.contiguous()
    a.step()
    b.step()
    assert rel_err(param, ref) <= 1e-6


@pytest.mark.parametrize("preset, ns_steps", [("keller", 5), ("quintic", 5), ("polar_express", 7), ("keller", 0),
                                              ("keller", 1)])
@pytest.mark.parametrize("shape", [(1, 1, 9), (3, 7, 13), (2, 16, 16), (1, 20, 64)])
def test_small_path_fp32_matches_fp64_recurrence(shape, preset, ns_steps):
    G = _randn(*shape)
    out = small_newton_schulz(G, resolve_ns_config(preset, ns_steps, 1e-7), torch.float32)
    assert rel_err(out, reference_ns(G, preset, ns_steps)) <= FP32_TOL


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float16])
def test_small_path_low_precision_within_baseline_error(ns_dtype):
    G = _randn(3, 12, 40)
    ref = reference_ns(G)
    out = small_newton_schulz(G, resolve_ns_config("keller", 5, 1e-7), ns_dtype)
    assert rel_err(out, ref) <= 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2


def test_small_path_isolates_nan():
    G = _randn(3, 8, 24)
    G[0, 1, 1] = float("nan")
    config = resolve_ns_config("keller", 3, 1e-7)
    out = small_newton_schulz(G, config, torch.float32)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()
    torch.testing.assert_close(out[2], small_newton_schulz(G[2:], config, torch.float32)[0], rtol=0, atol=0)


def test_small_path_budget_is_bytes_not_a_side_length():
    assert fits(64, 256, torch.bfloat16, 90) and not fits(64, 256, torch.float32, 90)
    assert fits(32, 128, torch.float32, 90) and not fits(32, 128, torch.float32, 86)
    assert not fits(256, 3072, torch.bfloat16, 90)  # 1.5 MB
    assert fits(128, 128, torch.bfloat16, 80) and not fits(128, 128, torch.bfloat16, 86)


def test_custom_ops_pass_opcheck():
    """Schemas, declared mutations and fake implementations are consistent (torch.library.opcheck)."""
    from muon_kernels.triton_kernels.fused_update import make_layout

    stack = _randn(2, 12, 20)
    torch.library.opcheck(torch.ops.muon_kernels.newton_schulz.default,
                          (stack, [3.4445, -4.775, 2.0315] * 2, 1e-7, 1.0, 0.0, torch.float32, "small", "frobenius",
                           "standard", []))
    torch.library.opcheck(torch.ops.muon_kernels.newton_schulz.default,
                          (stack, [3.4445, -4.775, 2.0315], 1e-7, 1.0, 0.0, torch.bfloat16, "symmetric", "frobenius",
                           "standard", []))
    torch.library.opcheck(torch.ops.muon_kernels.newton_schulz.default,
                          (stack, [3.4445, -4.775, 2.0315] * 3, 1e-7, 1.0, 0.0, torch.float32, "symmetric", "aol",
                           "gram", [1]))
    torch.library.opcheck(torch.ops.muon_kernels.newton_schulz.default,
                          (stack, [3.4445, -4.775, 2.0315] * 2, 1e-7, 1.0, 0.0, torch.bfloat16, "cublas", "frobenius",
                           "standard", []))
    views = [(1, 12, 20, False, False, 20), (1, 20, 12, True, True, 12)]
    layout = make_layout(views, torch.device("cpu"))
    grads = [_randn(12, 20, seed=1), _randn(20, 12, seed=2)]
    bufs = [torch.zeros(12, 20), torch.zeros(20, 12)]
    torch.library.opcheck(torch.ops.muon_kernels.fused_momentum.default,
                          (grads, bufs, torch.tensor([0.9, 0.1, 0.95, 0.05]), *layout, torch.empty(2, 12, 20), True, True,
                           [], [], []))
    params = [_randn(12, 20, seed=3), _randn(20, 12, seed=4)]
    for cautious in (False, True):
        torch.library.opcheck(torch.ops.muon_kernels.fused_apply_update.default,
                              (params, torch.tensor([-0.01, -0.02]), torch.tensor([0.999, 1.0]), *layout,
                               _randn(2, 12, 20, seed=5), cautious))
    # The variants: the statistics pass (mutating NorMuon's v and the row scales) and the update with factors.
    from muon_kernels.triton_kernels.variant_statistics import matrix_table

    # (Without NorMuon: its v is reached through the table's addresses, which opcheck's cloned
    # arguments cannot follow; test_variants_triton.py checks that mutation.)
    table = matrix_table(params, [], [(1, 12, 20, False, False, 12), (1, 20, 12, True, True, 12)], torch.device("cpu"))
    torch.library.opcheck(torch.ops.muon_kernels.variant_statistics.default,
                          (_randn(2, 12, 20, seed=6), params, [], table, None, False, True, 0.95, 1e-10))
    torch.library.opcheck(torch.ops.muon_kernels.fused_apply_update.default,
                          (params, torch.tensor([-0.01, -0.02]), torch.tensor([1.0, 1.0]), *layout,
                           _randn(2, 12, 20, seed=5), False, torch.rand(2, 20), torch.rand(2), torch.rand(2)))
    partials = torch.rand(2, 3, 4)
    for normuon, hyperball in [(True, False), (True, True)]:
        torch.library.opcheck(torch.ops.muon_kernels.variant_factors.default,
                              (partials, torch.tensor([-0.01, -0.02]), torch.tensor([1.5, 2.0]), normuon, hyperball,
                               1e-10, 1e-8))


def test_backends_run_the_op_body_in_eager_and_the_op_when_traced():
    """``ops.eager_or_traced``: in eager execution the backends skip the custom-op dispatcher (its
    host cost) yet compute the same bits and bump the written tensors' version counters like the
    op, so autograd still refuses a backward through a tensor the step changed; under a dispatch
    mode (fake tensors, export, torch.compile's tracing) the op itself is what gets called."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from muon_kernels.triton_kernels import ops
    from muon_kernels.triton_kernels.fused_update import make_layout

    layout = make_layout([(1, 12, 20, False, False, 20), (1, 20, 12, True, True, 12)], torch.device("cpu"))
    ortho = _randn(2, 12, 20, seed=5)
    scalars = (torch.tensor([-0.01, -0.02]), torch.tensor([0.999, 1.0]))
    eager = [_randn(12, 20, seed=3).requires_grad_(), _randn(20, 12, seed=4)]
    by_op = [p.detach().clone() for p in eager]
    saved = (eager[0] * eager[0]).sum()  # keeps eager[0] for its backward
    versions = [p._version for p in eager]
    with torch.no_grad():
        ops.fused_apply_update_launch(eager, *scalars, *layout, ortho, False)
    torch.ops.muon_kernels.fused_apply_update(by_op, *scalars, *layout, ortho, False)
    for p, q, v in zip(eager, by_op, versions):
        assert torch.equal(p.detach(), q)
        assert p._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    stack = _randn(2, 12, 20, seed=6)
    args = (stack, [3.4445, -4.775, 2.0315] * 2, 1e-7, 1.0, 0.0, torch.float32, "symmetric", "frobenius", "standard",
            [])
    with Calls() as calls:
        traced = ops.newton_schulz_launch(*args)
    assert calls.names[0] == "muon_kernels.newton_schulz"
    assert torch.equal(traced, ops.newton_schulz_launch(*args))
    # A stack that asks for gradients goes through the op, whose backward refuses (no derivative).
    wanting = (stack.clone().requires_grad_(), *args[1:])
    with pytest.raises(RuntimeError, match="no autograd formula"):
        ops.newton_schulz_launch(*wanting).sum().backward()


def test_tensor_lr_in_the_fused_update_matches_float_lr():
    """A tensor lr is combined with each parameter's scale and decay on the device (no host read)."""
    results = []
    for lr in (0.05, torch.tensor(0.05)):
        ps = _bucket_params(torch.float32, seed=5)
        groups = [{"params": ps[:2], "use_muon": True}, {"params": ps[2:], "use_muon": True, "matrix_view": "batch"}]
        opt = mk.Muon(groups, lr=lr, weight_decay=0.2, backend="triton", ns_dtype=torch.float32, ns_steps=1)
        g = torch.Generator().manual_seed(6)
        for step in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            for group in opt.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(0.02)
                else:
                    group["lr"] = 0.02
        results.append(ps)
    for a, b in zip(*results):
        assert rel_err(b, a) <= 1e-6


@pytest.mark.parametrize("options", [{}, {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0},
                                     {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"}])
def test_32_bit_and_int64_index_arithmetic_give_the_same_bits(options, monkeypatch):
    """The fused kernels' index decomposition (triton_kernels/fused_update.py ``_divmod``) in 32 bits,
    as every launch below 2^31 elements compiles it, and in int64 (the fallback above): the same
    parameters and momentum bit for bit, over wide, tall (transposed in the stack), batched, row-split
    and column-split (row stride ≠ columns) matrices, with NorMuon's neuron index and stochastic
    rounding's element index in play."""
    from muon_kernels.triton_kernels import fused_update

    results = {}
    used = []
    for index32 in (True, False):
        monkeypatch.setattr(fused_update, "index32", lambda stack, v=index32: used.append(v) or v)
        g = torch.Generator().manual_seed(11)
        shapes = [(12, 20), (20, 12), (3, 12, 20)]
        ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.2) for s in shapes]
        qkv = torch.nn.Parameter(torch.randn(36, 12, generator=g) * 0.2)
        c_attn = torch.nn.Parameter(torch.randn(12, 36, generator=g) * 0.2)
        pieces = {k: v for k, v in options.items() if k not in ("constraint", "weight_decay")}  # no hyperball there
        groups = [{"params": ps[:2], **options}, {"params": ps[2:], "matrix_view": "batch", **options},
                  {"params": [qkv], "split_sizes": (12, 12, 12), **pieces},
                  {"params": [c_attn], "split_sizes": (12, 12, 12), "matrix_view": "transposed", **pieces}]
        everything = ps + [qkv, c_attn]
        opt = mk.Muon(groups, lr=0.05, backend="triton", ns_dtype=torch.float32, ns_steps=2)
        for _ in range(2):
            for p in everything:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results[index32] = [p.detach().clone() for p in everything] + \
            [opt.state[p]["momentum_buffer"].clone() for p in everything]
    assert set(used) == {True, False}
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [{}, {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0},
                                     {"weight_decay_mode": "cautious", "weight_decay": 0.1}])
def test_vector_and_per_element_paths_give_the_same_bits(options, monkeypatch):
    """The fused kernels' 16-byte path (ALIGNED: contiguous tensors whose sizes are multiples of 8 at
    16-byte aligned addresses; wide tensors' stack slices as vectors, tall ones transposed element by
    element) and their per-element path: the same parameters and momentum bit for bit, over wide,
    tall and batched matrices, bf16 and fp32; the default step takes the vector path."""
    from muon_kernels.triton_kernels import fused_update

    real_launch, taken = fused_update.launch, []

    def recording(kernel, grid, *args, **constexprs):
        taken.append(constexprs["ALIGNED"])
        real_launch(kernel, grid, *args, **constexprs)

    monkeypatch.setattr(fused_update, "launch", recording)
    results = {}
    for vector in (True, False):
        if not vector:
            monkeypatch.setattr(fused_update, "aligned", lambda *args: False)
        taken.clear()
        g = torch.Generator().manual_seed(12)
        ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.2).to(dtype))
              for s, dtype in [((16, 24), torch.float32), ((24, 16), torch.float32), ((2, 16, 24), torch.float32),
                               ((16, 40), torch.bfloat16), ((40, 16), torch.bfloat16)]]
        groups = [{"params": ps[:2], **options}, {"params": ps[2:3], "matrix_view": "batch", **options},
                  {"params": ps[3:], **options}]
        opt = mk.Muon(groups, lr=0.05, backend="triton", ns_dtype=torch.float32, ns_steps=2)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        assert taken and set(taken) == {vector}
        results[vector] = [p.detach().clone() for p in ps] + [opt.state[p]["momentum_buffer"].clone() for p in ps]
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)


def test_vector_path_only_for_contiguous_multiple_of_8_tensors_at_aligned_addresses():
    from muon_kernels.triton_kernels.fused_update import aligned, make_layout

    cpu = torch.device("cpu")
    good = make_layout([(1, 16, 24, False, False, 24), (2, 24, 16, True, False, 16)], cpu)
    assert good.vectorizable and aligned(good, 4096, 8192, 1 << 20)
    assert not aligned(good, 4096, 8192 + 4)  # one address 4 bytes off (a view inside a flat buffer)
    assert not aligned(good, 4096 + 8, 8192)  # 8 bytes off: an 8-byte access, not a 16-byte one
    assert not make_layout([(1, 16, 24, False, False, 24), (1, 3, 5, False, False, 5)], cpu).vectorizable  # 15 elements
    assert not make_layout([(1, 16, 8, False, False, 24)], cpu).vectorizable  # a column piece of a 16×24 matrix


def test_32_bit_indices_only_while_the_stack_and_one_masked_block_stay_below_2_to_the_31():
    from muon_kernels.triton_kernels.fused_update import _block, index32

    edge = 2**31 - _block()  # the last program's masked lanes reach numel + block - 1
    assert index32(torch.empty(edge - 1, device="meta"))
    assert not index32(torch.empty(edge, device="meta"))


def test_the_interpreter_reads_scalars_whatever_numpy_says():
    """Triton 3.6's interpreter converted a scalar loop bound with int(1-element array), which numpy
    >= 2.4 refuses (every kernel with a runtime range failed); config squeezes it first, as 3.9 does.
    (The Triton 3.6 pass with numpy 2.4 is the real check: every split-K kernel loops over a range.)"""
    from triton.runtime import interpreter

    from muon_kernels.triton_kernels import config

    assert config.is_interpreting() and interpreter._patch_lang_tensor.squeezes_scalars


def test_small_path_fp16_rounds_where_the_multi_kernel_path_stores():
    """On diag(σ) every product is one term per entry, so the fp16 recurrence can be emulated exactly:
    fp32 arithmetic, rounded to fp16 where the multi-kernel path stores A = X·Xᵀ, B = b·A + c·A·A and
    X = a·X + B·X. The one-kernel path keeps them in registers and must round them just the same
    (the interpreter rounds fp16 to nearest; bf16 is checked on a GPU)."""
    import numpy as np

    sigma = torch.logspace(0, -2.5, 64, dtype=torch.float64)
    G = torch.zeros(1, 64, 80)
    G[0, :, :64] = torch.diag(sigma).float()
    config = resolve_ns_config("keller", 5, 1e-7)
    out = small_newton_schulz(G, config, torch.float16)
    x = normalize(G, config, torch.float16)[0].diagonal().numpy()
    f32, f16 = np.float32, np.float16
    for a, b, c in config.coefficients:
        a, b, c = f32(a), f32(b), f32(c)
        xs = x.astype(f32)
        A = (xs * xs).astype(f16).astype(f32)
        B = (b * A + c * (A * A)).astype(f16).astype(f32)
        x = (a * xs + B * xs).astype(f16)
    assert np.array_equal(out[0].diagonal().numpy(), x)
    assert torch.count_nonzero(out[0, :, :64] - torch.diag(out[0].diagonal())) == 0
