"""NorMuon and the hyperball in the Triton backend (statistics kernel + fused update, CPU
interpreter) against the torch backend, whole optimizer steps on a bucket that mixes wide, tall,
(in, out)-stored and 3D expert matrices, so every neuron orientation of the kernels is exercised."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from oracles import rel_err

# Every case of the statistics kernel's stack-coordinate loops: neurons on the stack's rows
# (wide (out, in); tall (in, out), transposed into the stack; 3D) or on its columns (tall (out, in),
# transposed; wide (in, out)).
SHAPES = [(12, 20), (20, 12), (12, 20), (3, 12, 20), (20, 12)]
VIEWS = [None, None, "transposed", "batch", "transposed"]


def _run(backend: str, dtype: torch.dtype, steps: int = 3, **options):
    g = torch.Generator().manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    groups = [{"params": [p], "matrix_view": v} for p, v in zip(ps, VIEWS)]
    opt = mk.Muon(groups, lr=0.05, weight_decay=0.0, backend=backend, ns_dtype=torch.float32, **options)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("options", [{"adaptive": "normuon"}, {"constraint": "hyperball"},
                                     {"adaptive": "normuon", "constraint": "hyperball"}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_variants_match_the_torch_backend(options, dtype):
    tol = {torch.float32: 2e-5, torch.bfloat16: 2.0**-7}[dtype]
    ref, ref_opt = _run("torch", dtype, **options)
    out, opt = _run("triton", dtype, **options)
    assert all(b.backend.NAME == "triton" for b in opt._buckets)
    for a, b in zip(ref, out):
        assert rel_err(b.detach(), a.detach()) <= tol
        for key in ("normuon_v", "hyperball_radius"):
            if key in ref_opt.state[a]:
                assert rel_err(opt.state[b][key], ref_opt.state[a][key]) <= 1e-5
    plain, _ = _run("triton", dtype)
    start, _ = _run("triton", dtype, steps=0)
    # The variant really acts: the displacements differ by more than rounding.
    assert any(rel_err(a.detach() - w0.detach(), b.detach() - w0.detach()) > 1e-2
               for a, b, w0 in zip(out, plain, start))


def test_statistics_kernel_sums_and_second_moments_match_the_torch_pass():
    """On one stack: the kernel's per-matrix sums (Σq, Σs²q, Σs·W·O, ΣW²) and NorMuon's updated v
    against the torch reference pass."""
    from muon_kernels import variants
    from muon_kernels.triton_kernels.variant_statistics import matrix_table

    ps, opt = _run("triton", torch.float32, steps=0, adaptive="normuon", constraint="hyperball")
    [bucket], _ = opt._plan_buckets([(i, grp, grp["params"]) for i, grp in enumerate(opt.param_groups)])
    opt._init_variant_state([bucket])
    g = torch.Generator().manual_seed(7)
    for p in ps:  # a v that is not all zeros
        opt.state[p]["normuon_v"].copy_(torch.rand(opt.state[p]["normuon_v"].shape, generator=g))
    ortho = torch.randn(bucket.matrices, bucket.m, bucket.n, generator=g)
    vs, _ = variants.state_tensors(bucket, opt.state)
    ref_vs = [v.clone() for v in vs]
    _, ref_sums = variants.torch_statistics(bucket, ortho, ref_vs)
    params = [e.param for e in bucket.entries]
    views = [(e.view.batch, e.view.rows, e.view.cols, e.view.transposed, *reversed(variants.neurons(e.view)))
             for e in bucket.entries]
    table = matrix_table(params, vs, views, bucket.device)
    row_scale = torch.full((bucket.matrices, bucket.n), float("nan"))
    partials = torch.ops.muon_kernels.variant_statistics(ortho, params, vs, table, row_scale, True, True, 0.95, 1e-10)
    assert rel_err(partials.sum(dim=1), ref_sums) <= 1e-6
    for v, ref in zip(vs, ref_vs):
        assert rel_err(v, ref) <= 1e-6
    offset = 0
    for e, v in zip(bucket.entries, vs):  # s = 1/(√v + ε) for every neuron of every matrix
        count = variants.neurons(e.view)[0]
        s = row_scale[offset: offset + e.view.batch, :count]
        assert rel_err(s, 1.0 / (v.view(e.view.batch, -1).sqrt() + 1e-10)) <= 1e-6
        offset += e.view.batch


@pytest.mark.parametrize("normuon, hyperball", [(True, False), (False, True), (True, True)])
def test_factors_kernel_is_the_torch_formula(normuon, hyperball):
    """The factors launch (one program per matrix, its blocks added in a fixed order, fp64 math) against
    ``variants.gains`` on the same partial sums: random sums over 300 blocks (more than one chunk of
    the kernel's loop), a matrix with lr 0 (c exactly 1), and a matrix whose O is zero (the clamps)."""
    from types import SimpleNamespace

    from muon_kernels import variants
    from muon_kernels.bucket import Variant
    from muon_kernels.triton_kernels.ops import variant_factors_launch

    g = torch.Generator().manual_seed(8)
    k, nb = 5, 300
    partials = torch.rand((k, nb, 4), generator=g)
    partials[..., 2] -= 0.5  # Σs·W·O takes either sign
    partials[3, :, :3] = 0.0  # zero O: Σq = Σs²q = Σs·W·O = 0
    alphas = -0.02 * torch.rand(k, generator=g)
    alphas[1] = 0.0  # lr 0: W must stay exactly where it is
    radius = 1.0 + torch.rand(k, generator=g)
    v = Variant(normuon=normuon, hyperball=hyperball, normuon_eps=1e-10, hyperball_eps=1e-8)
    bucket = SimpleNamespace(variant=v, entries=[SimpleNamespace(view=SimpleNamespace(batch=1))] * k,
                             device=torch.device("cpu"), cache={})
    ref_g, ref_c = variants.gains(bucket, partials.sum(dim=1), alphas, [radius])
    gains, shrink = variant_factors_launch(partials, alphas if hyperball else None, radius if hyperball else None,
                                           normuon, hyperball, v.normuon_eps, v.hyperball_eps)
    # the only difference: the order the fp32 block sums are added in
    assert rel_err(gains, ref_g) <= 1e-6
    assert torch.isfinite(gains).all()
    if hyperball:
        assert rel_err(shrink, ref_c) <= 1e-6
        assert shrink[1] == 1.0
    else:
        assert shrink.numel() == 0
    again = variant_factors_launch(partials, alphas if hyperball else None, radius if hyperball else None,
                                   normuon, hyperball, v.normuon_eps, v.hyperball_eps)
    assert torch.equal(again[0], gains)  # a fixed order: the same bits on repeat
    # NaN sums stay NaN, as torch's clamp_min keeps them (no finite factor out of a NaN matrix)
    partials[2, 7] = float("nan")
    ref_g, ref_c = variants.gains(bucket, partials.sum(dim=1), alphas, [radius])
    gains, shrink = variant_factors_launch(partials, alphas if hyperball else None, radius if hyperball else None,
                                           normuon, hyperball, v.normuon_eps, v.hyperball_eps)
    assert torch.isnan(ref_g[2]) and torch.isnan(gains[2])
    if hyperball:
        assert torch.isnan(ref_c[2]) and torch.isnan(shrink[2])


def test_every_op_body_launches_on_its_tensors_device(monkeypatch):
    """Triton launches go to the current device, so each op body makes its tensors' device current
    (``workspace.on_device``): a step on a GPU that is not the current one would otherwise launch on
    the current one with the other's addresses. A NorMuon + hyperball step reaches every op."""
    import contextlib
    import sys

    from muon_kernels.triton_kernels import ops

    seen = set()

    def on_device(device):
        seen.add((sys._getframe(1).f_code.co_name, device.type))
        return contextlib.nullcontext()

    monkeypatch.setattr(ops, "on_device", on_device)
    p = torch.nn.Parameter(torch.randn(24, 40))
    opt = mk.Muon([p], lr=0.02, backend="triton", adaptive="normuon", constraint="hyperball", weight_decay=0.0)
    p.grad = torch.randn(24, 40)
    opt.step()
    assert seen == {(name, "cpu") for name in ("_newton_schulz", "fused_momentum_op", "fused_apply_update_op",
                                                 "variant_statistics_op", "variant_factors_op")}


@pytest.mark.parametrize("options", [{"constraint": "hyperball"}, {"adaptive": "normuon", "constraint": "hyperball"}])
def test_hyperball_on_column_slices_of_wider_matrices(options):
    """Parameters that are column slices of a wider matrix (stride (ld, 1): the fused update takes
    them): the statistics pass read W as if it were contiguous, so ΣW·O and ΣW² came from the wrong
    memory — W left its sphere (17×33: ‖W‖ 2.4495 for radius 2.4370; tall 33×10: 9.7× the torch
    backend's displacement error)."""
    def run(backend):
        g = torch.Generator().manual_seed(6)
        storage = [torch.randn(rows, cols + 9, generator=g) for rows, cols in ((17, 33), (33, 10), (12, 20))]
        before = [s.clone() for s in storage]
        ps = [torch.nn.Parameter(s[:, 5:5 + s.shape[1] - 9]) for s in storage]
        assert all(not p.is_contiguous() and p.stride(1) == 1 for p in ps)
        views = [None, None, "transposed"]
        opt = mk.Muon([{"params": [p], "matrix_view": v} for p, v in zip(ps, views)], lr=0.05, weight_decay=0.0,
                      backend=backend, ns_dtype=torch.float32, **options)
        radii = [p.detach().norm() for p in ps]
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return ps, radii, storage, before

    ref, radii, _, _ = run("torch")
    out, _, storage, before = run("triton")
    for a, b, r in zip(ref, out, radii):
        assert rel_err(b.detach(), a.detach()) <= 2e-5
        assert abs(float(b.detach().norm()) - float(r)) <= 1e-5 * float(r)  # on its sphere
    for s, s0 in zip(storage, before):  # the columns around each slice are untouched
        assert torch.equal(s[:, :5], s0[:, :5]) and torch.equal(s[:, -4:], s0[:, -4:])


def test_a_normuon_v_replaced_between_steps_is_the_one_the_kernel_updates():
    """A trainer resetting ``normuon_v`` by hand (a new tensor, the same plan): the statistics table
    holds state addresses, so it must be rebuilt — the kernel updates the new tensor, like torch."""
    def run(backend):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(12, 20, generator=g))
        opt = mk.Muon([p], lr=0.05, weight_decay=0.0, backend=backend, adaptive="normuon", ns_dtype=torch.float32)
        for i in range(3):
            p.grad = torch.randn(12, 20, generator=g)
            if i == 2:
                opt.state[p]["normuon_v"] = torch.zeros(12)
            opt.step()
        return p.detach(), opt.state[p]["normuon_v"]

    (ref, ref_v), (out, out_v) = run("torch"), run("triton")
    assert rel_err(out_v, ref_v) <= 1e-5 and rel_err(out, ref) <= 1e-5


def test_a_tensor_lr_applies_each_groups_weight_decay():
    """Two groups with weight decay 0 and 0.5 in one bucket: a tensor lr steps like the float lr."""
    results = []
    for lr in (0.05, torch.tensor(0.05)):
        g = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(12, 20, generator=g)) for _ in range(2)]
        opt = mk.Muon([{"params": [ps[0]], "weight_decay": 0.0}, {"params": [ps[1]], "weight_decay": 0.5}], lr=lr,
                      backend="triton", ns_dtype=torch.float32, ns_steps=1)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        assert len(opt._buckets) == 1
        results.append([p.detach() for p in ps])
    for a, b in zip(*results):
        assert rel_err(b, a) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hyperball_update_of_16_bit_weights_is_torchs_three_ops_bit_for_bit(dtype):
    """The torch backend's hyperball update on 16-bit weights: ``mul_(decay)``, ``add_(g·O, alpha)``,
    then ``mul_(shrink)``, each rounded to the weight's dtype. The fused kernel, handed the same gain
    and shrink factors, gives those bits: a missed rounding before the shrink changes many elements."""
    from muon_kernels.triton_kernels.fused_update import fused_apply_update, make_layout

    g = torch.Generator().manual_seed(9)
    w = torch.randn(2, 12, 20, generator=g).to(dtype)
    ortho = torch.randn(2, 12, 20, generator=g)
    gains, shrink = torch.tensor([0.75, 1.25]), torch.tensor([0.9, 1.1])
    alphas, decays = torch.tensor([-0.3]), torch.tensor([0.95])
    param = w.clone()
    fused_apply_update([param], alphas, decays, make_layout([(2, 12, 20, False, False, 20)], w.device), ortho,
                       gains=gains, shrink=shrink)
    o = (ortho * gains[:, None, None]).to(dtype).double()
    added = ((w.float() * decays).to(dtype).double() + alphas.double() * o).float()  # add_: one fp32 rounding
    expected = (added.to(dtype).float() * shrink[:, None, None]).to(dtype)
    assert torch.equal(param, expected)
    skipped = (added * shrink[:, None, None]).to(dtype)
    assert not torch.equal(skipped, expected)  # the check can tell the roundings apart
