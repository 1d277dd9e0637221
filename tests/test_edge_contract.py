"""The contract at its edges (torch backend; the Triton interpreter twins are in tests/interpreter/):
extreme gradient scales, an accurate fp32 norm, atomic add_param_group, settings rewritten between
steps, fp64 scalars, 4D tensors in "batch" groups, layout independence."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels.backends import torch_backend
from muon_kernels.ns_config import resolve_ns_config
from oracles import negative_largest_entry, reference_ns, rel_err

FP32_TOL = 1e-4  # DESIGN.md §5: fp32 iteration against the fp64 recurrence
# The output comes back in the input's dtype: one more rounding, half an ulp relative.
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8}


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------- extreme scales (issue: eps=0 NaN, 1e30 zero)
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-25, 1e-20, 1e20, 1e30])
@pytest.mark.parametrize("shape", [(1, 3), (1, 1), (7, 5), (3, 24, 10)])
def test_orthogonalize_is_scale_free_from_1e_minus_30_to_1e30(shape, scale, storage):
    G = (_randn(*shape) * scale).to(storage)
    assert torch.isfinite(G).all() and (G != 0).any()
    out = mk.orthogonalize(G, eps=0.0, ns_dtype=torch.float32, backend="torch")
    ref = reference_ns(G.double(), eps=0.0)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= FP32_TOL + OUTPUT_ROUNDING[storage]


@pytest.mark.parametrize("scale", [1e-40, 1e-44, 1e38])
@pytest.mark.parametrize("shape", [(7, 5), (3, 24, 10)])
def test_fp32_subnormal_and_near_overflow_stacks_normalize(shape, scale):
    """Past the power-of-two scaling's exponent range (fp32 subnormals down to 1e-44, entries up to
    1e38): the scale is clamped to a representable 2^±126, and the result is still the fp64
    recurrence's on the same (rounded) input."""
    G = (_randn(*shape) * scale).to(torch.float32)
    assert torch.isfinite(G).all() and (G != 0).any()
    out = mk.orthogonalize(G, eps=0.0, ns_dtype=torch.float32, backend="torch")
    assert torch.isfinite(out).all()
    assert rel_err(out, reference_ns(G.double(), eps=0.0)) <= FP32_TOL


def test_the_largest_magnitude_may_be_a_negative_entry():
    """The scale comes from max |x|, negative entries included: one entry of -1e30 among entries of
    1e-30 scaled by the positive maximum's 2^100 would overflow to -inf."""
    G = negative_largest_entry((2, 7, 5))
    out = mk.orthogonalize(G, eps=0.0, ns_dtype=torch.float32, backend="torch")
    assert torch.isfinite(out).all()
    assert rel_err(out, reference_ns(G.double(), eps=0.0)) <= FP32_TOL


def test_huge_gradient_still_updates_and_tiny_one_with_eps_zero_is_not_nan():
    for scale, eps in ((1e30, 1e-7), (1e-25, 0.0)):
        p = nn.Parameter(torch.ones(1, 5))
        q = nn.Parameter(torch.ones(1, 5))
        g = _randn(1, 5, dtype=torch.float32)
        opt = mk.Muon([p], lr=0.1, weight_decay=0.0, eps=eps, ns_dtype=torch.float32)
        unit = mk.Muon([q], lr=0.1, weight_decay=0.0, eps=eps, ns_dtype=torch.float32)
        p.grad, q.grad = g * scale, g.clone()
        opt.step()
        unit.step()
        assert torch.isfinite(p).all() and not torch.equal(p, torch.ones(1, 5))
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # the direction does not depend on the scale


@pytest.mark.parametrize("shape", [(768, 3072), (2304, 768)])
def test_fp32_norm_is_accurate_on_large_matrices(shape):
    """Bound tied to fp32 rounding: a few ulps of the result, not torch's own 4e-5 one-pass error."""
    G = _randn(1, *shape, seed=3, dtype=torch.float32)
    config = resolve_ns_config("keller", 0, 0.0)
    out = torch_backend.normalize(G, config, torch.float32)
    exact = G.double() / G.double().norm()
    assert abs(out.double().norm().item() - 1.0) <= 4 * 2.0**-24
    assert rel_err(out, exact) <= 4 * 2.0**-24


def test_fp32_orthogonalize_of_768x3072_is_within_2e6_of_the_fp64_recurrence():
    G = _randn(768, 3072, seed=4, dtype=torch.float32)
    out = mk.orthogonalize(G, ns_dtype=torch.float32, backend="torch")
    assert rel_err(out, reference_ns(G.double())) <= 2e-6


def test_zero_nan_and_inf_matrices_keep_their_meaning():
    G = _randn(3, 4, 6, dtype=torch.float32)
    G[0] = 0.0
    G[1, 0, 0] = float("nan")
    G[2, 1, 2] = float("inf")
    out = mk.orthogonalize(G, eps=0.0, ns_dtype=torch.float32, backend="torch")
    assert torch.equal(out[0], torch.zeros(4, 6))
    assert out[1].isnan().all()
    assert out[2].isnan().any()  # inf/inf, like torch.optim.Muon: never a silent finite answer


# ---------------------------------------------------------------- add_param_group is all or nothing
def _snapshot(opt):
    return [dict(g, params=list(g["params"])) for g in opt.param_groups]


@pytest.mark.parametrize("bad", ["duplicate", "betas"])
def test_add_param_group_without_use_muon_adds_nothing_when_either_half_is_refused(bad):
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    opt = mk.Muon([w, b])
    new_w, new_b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))
    before = _snapshot(opt)
    group = {"params": [new_w, b]} if bad == "duplicate" else {"params": [new_w, new_b], "betas": (1.5, 0.9)}
    with pytest.raises(ValueError):
        opt.add_param_group(group)
    assert len(opt.param_groups) == len(before)
    assert all(new_w is not p for g in opt.param_groups for p in g["params"])
    new_w.grad = torch.randn(5, 4)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    kept = new_w.detach().clone()
    opt.step()
    assert torch.equal(new_w, kept)  # never stepped


# ---------------------------------------------------------------- settings rewritten between steps
def _model_and_opt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    opt = mk.Muon(model.parameters(), lr=0.02, ns_dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # momentum exists, so "nothing modified" covers state too
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model, opt


BAD_SETTINGS = [
    (0, "lr", torch.tensor([0.1, 0.2]), "lr"),
    (0, "lr", -0.1, "lr"),
    (0, "momentum", 1.5, "momentum"),
    (0, "momentum", 1.0, "momentum"),
    (0, "weight_decay", -0.5, "weight_decay"),
    (0, "nesterov", "yes", "nesterov"),
    (0, "momentum_form", "adam", "momentum_form"),
    (0, "ns_dtype", torch.float64, "ns_dtype"),
    (0, "ns_coefficients", "nope", "ns_coefficients"),
    (1, "betas", (1.5, 0.9), "betas"),
    (1, "lr", -1.0, "lr"),
]


@pytest.mark.parametrize("group, key, value, named", BAD_SETTINGS, ids=[f"{g}-{k}-{v}" for g, k, v, _ in BAD_SETTINGS])
def test_bad_settings_written_after_construction_raise_before_anything_is_modified(group, key, value, named):
    model, opt = _model_and_opt()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.param_groups[group][key] = value
    with pytest.raises(ValueError, match=rf"param group {group}: .*{named}"):
        opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.state_dict()["state"]
    for pid, entry in state.items():
        for k, v in entry.items():
            assert torch.equal(after[pid][k], v) if isinstance(v, torch.Tensor) else after[pid][k] == v


def test_a_good_rewrite_is_accepted_and_a_fixed_bad_one_recovers():
    model, opt = _model_and_opt()
    opt.param_groups[0]["lr"] = 0.05
    opt.step()
    opt.param_groups[0]["momentum"] = 2.0
    with pytest.raises(ValueError):
        opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    opt.step()


# ---------------------------------------------------------------- fp64 parameters keep fp64 scalars
@pytest.mark.parametrize("lr, wd", [(0.02, 0.1), (1e-4, 1e-4)])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_fp64_decay_is_exact_in_fp64(lr, wd, tensor_lr):
    p = nn.Parameter(torch.ones(3, 4, dtype=torch.float64))
    rate = torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr
    opt = mk.Muon([p], lr=rate, weight_decay=wd)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p, torch.full_like(p, 1.0 - lr * wd))


def test_fp64_sgd_momentum_applies_mu_in_fp64():
    p = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = mk.Muon([p], momentum=0.95, momentum_form="sgd", weight_decay=0.0)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.full_like(p, 0.95 * 1.0 + 1.0))


# ---------------------------------------------------------------- 4D tensors in a "batch" group
def test_batch_view_applies_to_3d_tensors_only_a_conv_stays_one_matrix():
    experts = nn.Parameter(_randn(2, 6, 5, dtype=torch.float32))
    conv = nn.Parameter(_randn(8, 4, 3, 3, seed=1, dtype=torch.float32))
    conv_alone = nn.Parameter(conv.detach().clone())
    opt = mk.Muon([experts, conv], matrix_view="batch", ns_dtype=torch.float32)
    alone = mk.Muon([conv_alone], ns_dtype=torch.float32)
    views = {row.shape: row.view for row in opt.plan()}
    assert views[(2, 6, 5)] == "batch 2×(6×5)"
    assert views[(8, 4, 3, 3)] == "flatten 8×36"
    g = _randn(8, 4, 3, 3, seed=2, dtype=torch.float32)
    experts.grad, conv.grad, conv_alone.grad = torch.zeros_like(experts), g, g.clone()
    opt.step()
    alone.step()
    assert torch.equal(conv, conv_alone)


# ---------------------------------------------------------------- layout independence
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7, 13), (3, 30, 20), (2, 16, 16)])
def test_orthogonalize_does_not_depend_on_input_strides(shape, ns_dtype):
    G = _randn(*shape, seed=5, dtype=torch.float32)
    strided = G.mT.contiguous().mT  # same values, column-major matrices
    assert not strided.is_contiguous()
    assert torch.equal(mk.orthogonalize(G, ns_dtype=ns_dtype, backend="torch"),
                       mk.orthogonalize(strided, ns_dtype=ns_dtype, backend="torch"))
