"""NorMuon (``adaptive="normuon"``) and the hyperball (``constraint="hyperball"``) against fp64
references written from their sources, 12 steps, on the torch backend:

- NorMuon, arXiv 2510.05491 and the authors' ``normuon.py``: v = lerp(v, mean over each output
  neuron's inputs of O², 1 - β2); O ⊙ 1/(√v + ε), rescaled to ‖O‖_F (+ ε in the divisor).
- Hyperball, MuonH (Wen et al.) / Emerging-Optimizers ``MuonHyperball``:
  W ← R·normalize(W − lr·R·normalize(O)), R the matrix's initial Frobenius norm.

The fused kernels are checked against the torch backend on the Triton interpreter
(tests/interpreter/test_variants_triton.py) and compiled for every arch (AOT, nvcc).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import muon_kernels as mk
from oracles import reference_ns

STEPS = 12
LR, MU, BETA2 = 0.05, 0.95, 0.95


def _neuron_axis(stored_in_out: bool) -> int:
    return 0 if stored_in_out else 1  # mean over the inputs of each output neuron


def _reference(W0, grads, *, normuon=False, hyperball=False, wd=0.0, stored_in_out=False, batch=False, eps=1e-10,
               with_v=False):
    """fp64, per matrix of the view, formula by formula; ``with_v``: (W, NorMuon's v)."""
    W = W0.double().clone()
    M = torch.zeros_like(W)
    mats = (lambda t: t) if batch else (lambda t: t.unsqueeze(0))
    V = torch.zeros(mats(W).shape[0], mats(W).shape[2 if stored_in_out else 1], dtype=torch.float64)
    R = mats(W).flatten(1).norm(dim=1)
    for G in grads:
        G = G.double()
        M = MU * M + (1 - MU) * G
        U = (1 - MU) * G + MU * M
        new = []
        for k, (u, w) in enumerate(zip(mats(U), mats(W))):
            O = reference_ns(u, "keller", 5)
            out, inp = (O.shape[1], O.shape[0]) if stored_in_out else O.shape
            if normuon:
                V[k] = BETA2 * V[k] + (1 - BETA2) * (O * O).mean(dim=_neuron_axis(stored_in_out))
                s = 1.0 / (V[k].sqrt() + eps)
                scaled = O * (s.unsqueeze(0) if stored_in_out else s.unsqueeze(1))
                O = scaled * O.norm() / (scaled.norm() + eps)
            if hyperball:
                step = w - LR * R[k] * O / O.norm()
                new.append(R[k] * step / step.norm())
            else:
                scale = max(1.0, out / inp) ** 0.5
                new.append(w * (1 - LR * wd) - LR * scale * O)
        W = torch.stack(new) if batch else new[0]
    return (W, V if batch else V[0]) if with_v else W


def _run(W0, grads, matrix_view=None, **options):
    W = nn.Parameter(W0.clone())
    opt = mk.Muon([{"params": [W], "matrix_view": matrix_view}], lr=LR, ns_dtype=torch.float32, backend="torch",
                  **options)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    return W.detach(), opt


def _data(shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(STEPS)]


def _close(W, ref, W0, bound=1e-4):
    displacement = (ref - W0.double()).norm()
    err = ((W.double() - ref).norm() / displacement).item()
    assert err <= bound, err


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_normuon_matches_the_formula(shape):
    W0, grads = _data(shape)
    W, opt = _run(W0, grads, adaptive="normuon", weight_decay=0.1)
    _close(W, _reference(W0, grads, normuon=True, wd=0.1), W0)
    assert opt.state_dict()["state"][0]["normuon_v"].shape == (shape[0],)
    # It is a different update: plain Muon ends elsewhere.
    plain, _ = _run(W0, grads, weight_decay=0.1)
    assert (plain - W).abs().max() > 1e-3


@pytest.mark.parametrize("eps", [1e-10, 1e-2])
def test_normuon_state_and_eps_are_the_formulas(eps):
    """The stored v is the mean over each neuron's inputs (a sum would rescale out of the step but not
    out of the checkpoint), and ε sits outside the square root — visible with a large normuon_eps."""
    W0, grads = _data((24, 40))
    W, opt = _run(W0, grads, adaptive="normuon", weight_decay=0.0, normuon_eps=eps)
    ref, V = _reference(W0, grads, normuon=True, eps=eps, with_v=True)
    _close(W, ref, W0)
    torch.testing.assert_close(opt.state[opt.param_groups[0]["params"][0]]["normuon_v"].double(), V, rtol=1e-4, atol=0)


def test_normuon_neurons_of_weights_stored_in_out_are_columns():
    """transformers' Conv1D stores (in, out): the statistic is per column there."""
    W0, grads = _data((24, 40))
    W, opt = _run(W0, grads, "transposed", adaptive="normuon", weight_decay=0.0, adjust_lr_fn="spectral")
    assert opt.state_dict()["state"][0]["normuon_v"].shape == (40,)
    _close(W, _reference_spectral_stored(W0, grads), W0)


def _reference_spectral_stored(W0, grads):
    """The same NorMuon reference for a weight stored (in, out), lr scale sqrt(out/in) ('spectral')."""
    W, M = W0.double().clone(), torch.zeros_like(W0, dtype=torch.float64)
    V = torch.zeros(W0.shape[1], dtype=torch.float64)
    for G in grads:
        G = G.double()
        M = MU * M + (1 - MU) * G
        O = reference_ns((1 - MU) * G + MU * M, "keller", 5)
        V = BETA2 * V + (1 - BETA2) * (O * O).mean(dim=0)
        scaled = O / (V.sqrt() + 1e-10).unsqueeze(0)
        O = scaled * O.norm() / (scaled.norm() + 1e-10)
        W = W - LR * (W0.shape[1] / W0.shape[0]) ** 0.5 * O
    return W


def test_normuon_per_expert_of_a_3d_stack():
    W0, grads = _data((3, 16, 24))
    W, opt = _run(W0, grads, "batch", adaptive="normuon", weight_decay=0.0)
    assert opt.state_dict()["state"][0]["normuon_v"].shape == (3, 16)
    _close(W, _reference(W0, grads, normuon=True, batch=True), W0)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_hyperball_matches_the_formula_and_keeps_the_norm(shape):
    W0, grads = _data(shape)
    W, opt = _run(W0, grads, constraint="hyperball", weight_decay=0.0)
    _close(W, _reference(W0, grads, hyperball=True), W0)
    torch.testing.assert_close(W.norm(), W0.norm(), rtol=2e-6, atol=0)
    torch.testing.assert_close(opt.state_dict()["state"][0]["hyperball_radius"], W0.norm(), rtol=1e-6, atol=0)


def test_hyperball_radius_per_expert():
    W0, grads = _data((3, 16, 24))
    W0[1] *= 10  # experts of different norms keep their own
    W, _ = _run(W0, grads, "batch", constraint="hyperball", weight_decay=0.0)
    torch.testing.assert_close(W.flatten(1).norm(dim=1), W0.flatten(1).norm(dim=1), rtol=2e-6, atol=0)
    _close(W, _reference(W0, grads, hyperball=True, batch=True), W0)


def test_hyperball_radii_are_concatenated_once_and_follow_their_tensors():
    """variants.radius_vector: one cat per bucket, reused while each radius is the same tensor at
    the same version; an in-place edit or a replaced tensor is picked up; inference tensors (no
    version counter) are concatenated every time."""
    from types import SimpleNamespace

    from muon_kernels import variants

    bucket = SimpleNamespace(cache={}, device=torch.device("cpu"))
    radii = [torch.tensor(2.0), torch.tensor([3.0, 4.0])]
    first = variants.radius_vector(bucket, radii)
    assert variants.radius_vector(bucket, radii) is first
    assert torch.equal(first, torch.tensor([2.0, 3.0, 4.0]))
    assert variants.radius_vector(bucket, radii, torch.float64).dtype == torch.float64
    radii[1].mul_(2)
    assert torch.equal(variants.radius_vector(bucket, radii), torch.tensor([2.0, 6.0, 8.0]))
    radii[0] = torch.tensor(5.0)
    assert torch.equal(variants.radius_vector(bucket, radii), torch.tensor([5.0, 6.0, 8.0]))
    with torch.inference_mode():
        frozen = [torch.tensor(1.0), torch.tensor(7.0)]
    assert torch.equal(variants.radius_vector(bucket, frozen), torch.tensor([1.0, 7.0]))
    assert variants.radius_vector(bucket, frozen) is not variants.radius_vector(bucket, frozen)


def test_an_edited_hyperball_radius_takes_effect_at_the_next_step():
    W0, grads = _data((24, 40))
    W = nn.Parameter(W0.clone())
    opt = mk.Muon([W], lr=0.02, constraint="hyperball", weight_decay=0.0)
    for G in grads[:2]:
        W.grad = G.clone()
        opt.step()
    opt.state[W]["hyperball_radius"].mul_(2)
    W.grad = grads[2].clone()
    opt.step()
    torch.testing.assert_close(W.norm(), 2 * W0.norm(), rtol=2e-6, atol=0)


def test_a_step_with_lr_zero_leaves_hyperball_parameters_bitwise_unchanged():
    """lr = 0 (a warm-up's first step; torch.distributed.checkpoint's state-initializing step) moves
    nothing: W is not re-projected by a factor a few ulps from 1."""
    W0, grads = _data((24, 40))
    W = nn.Parameter(W0.clone())
    opt = mk.Muon([W], lr=0.0, constraint="hyperball", adaptive="normuon", weight_decay=0.0)
    for G in grads[:3]:
        W.grad = G.clone()
        opt.step()
    assert torch.equal(W.detach(), W0)


def test_normuon_and_hyperball_together():
    W0, grads = _data((24, 40))
    W, _ = _run(W0, grads, adaptive="normuon", constraint="hyperball", weight_decay=0.0)
    _close(W, _reference(W0, grads, normuon=True, hyperball=True), W0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_stay_on_the_sphere(dtype):
    """16-bit parameters: one rounding of each stored value, so the norm is kept to the dtype's eps."""
    W0, grads = _data((32, 48))
    W = nn.Parameter(W0.to(dtype))
    opt = mk.Muon([W], lr=LR, constraint="hyperball", adaptive="normuon", weight_decay=0.0, backend="torch")
    for G in grads:
        W.grad = G.to(dtype)
        opt.step()
    eps = torch.finfo(dtype).eps
    assert abs(W.float().norm() / W0.to(dtype).float().norm() - 1) <= 2 * eps
    assert opt.state[W]["normuon_v"].dtype == torch.float32


# ------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("options, message", [
    ({"adaptive": "adamuon"}, "adaptive must be one of"),
    ({"constraint": "sphere"}, "constraint must be one of"),
    ({"normuon_beta2": 1.0}, "normuon_beta2"),
    ({"normuon_eps": 0.0}, "normuon_eps"),
    ({"constraint": "hyperball"}, "weight_decay=0"),
    ({"constraint": "hyperball", "weight_decay": 0.0, "weight_decay_mode": "cautious"}, "weight_decay_mode"),
])
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        mk.Muon([nn.Parameter(torch.randn(4, 4))], **options)


def test_a_constructor_hyperball_takes_the_groups_own_weight_decay():
    """Groups that set weight_decay=0 may take constraint='hyperball' from the constructor, whose
    own weight_decay keeps its 0.1 default (a group that takes that default is refused)."""
    W, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.zeros(8))
    opt = mk.Muon([{"params": [W], "use_muon": True, "weight_decay": 0.0}, {"params": [b], "use_muon": False}],
                  constraint="hyperball")
    assert opt.param_groups[0]["constraint"] == "hyperball"
    with pytest.raises(ValueError, match=r"pass weight_decay=0 \(got 0.1; it defaults to 0.1"):
        mk.Muon([{"params": [W], "use_muon": True}], constraint="hyperball")


def test_bad_options_written_into_a_group_modify_nothing():
    W = nn.Parameter(torch.randn(8, 12))
    opt = mk.Muon([W], adaptive="normuon", weight_decay=0.0)
    W.grad = torch.randn_like(W)
    opt.step()
    before = (W.detach().clone(), {k: v.clone() for k, v in opt.state[W].items()})
    opt.param_groups[0]["adaptive"] = "normuonn"
    with pytest.raises(ValueError, match="param group 0: adaptive must be one of .*nothing was modified"):
        opt.step()
    assert torch.equal(W.detach(), before[0])
    assert all(torch.equal(opt.state[W][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("adaptive", ["none", "normuon"])
@pytest.mark.parametrize("entry, norm", [(0.0, "0.0"), (float("nan"), "nan"), (float("inf"), "inf"),
                                         (3e38, "inf")])  # 3e38: finite entries whose fp32 norm overflows
def test_a_matrix_without_a_finite_nonzero_norm_under_hyperball_raises_and_modifies_nothing(adaptive, entry, norm):
    """The radius is the initial norm: 0 (nothing to scale to), NaN or inf (every later step would be
    NaN) are refused, naming the parameter and the norm, before anything is stored."""
    live = nn.Parameter(torch.randn(8, 12))
    dead = nn.Parameter(torch.zeros(8, 12))
    if entry:
        dead.data[:2] = entry
    opt = mk.Muon([("live", live), ("dead", dead)], constraint="hyperball", adaptive=adaptive, weight_decay=0.0)
    for p in (live, dead):
        p.grad = torch.randn_like(p)
    before = live.detach().clone()
    with pytest.raises(ValueError, match=f"parameter 'dead'.*has norm {norm}; .*finite, nonzero norm"):
        opt.step()
    assert torch.equal(live.detach(), before)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}  # not even an empty entry (NorMuon's v)


def test_plan_names_the_variant():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
    opt = mk.Muon(mk.param_groups(model), adaptive="normuon", constraint="hyperball", weight_decay=0.0)
    whys = [r.why for r in opt.plan() if r.method == "Muon"]
    assert whys and all("NorMuon (β2=0.95)" in w and "hyperball" in w for w in whys)


def test_state_dict_round_trip_resumes_bit_identically():
    W0, grads = _data((24, 40))
    options = dict(adaptive="normuon", constraint="hyperball", weight_decay=0.0, ns_dtype=torch.float32)
    W = nn.Parameter(W0.clone())
    opt = mk.Muon([W], lr=LR, **options)
    for G in grads[:6]:
        W.grad = G.clone()
        opt.step()
    saved, W_saved = copy.deepcopy(opt.state_dict()), W.detach().clone()  # state_dict() holds live tensors
    for G in grads[6:]:
        W.grad = G.clone()
        opt.step()
    W2 = nn.Parameter(W_saved.clone())
    opt2 = mk.Muon([W2], lr=LR, **options)
    opt2.load_state_dict(saved)
    for G in grads[6:]:
        W2.grad = G.clone()
        opt2.step()
    assert torch.equal(W.detach(), W2.detach())
    assert saved["param_groups"][0]["adaptive"] == "normuon" and saved["param_groups"][0]["constraint"] == "hyperball"


def test_bf16_parameters_keep_fp32_variant_state_through_a_checkpoint():
    W = nn.Parameter(torch.randn(8, 12, dtype=torch.bfloat16))
    opt = mk.Muon([W], adaptive="normuon", constraint="hyperball", weight_decay=0.0)
    W.grad = torch.randn_like(W)
    opt.step()
    opt2 = mk.Muon([W], adaptive="normuon", constraint="hyperball", weight_decay=0.0)
    opt2.load_state_dict(opt.state_dict())
    for key in ("normuon_v", "hyperball_radius"):
        assert opt2.state[W][key].dtype == torch.float32
        assert torch.equal(opt2.state[W][key], opt.state[W][key])


@pytest.mark.parametrize("saved, current, key", [
    ({"adaptive": "normuon"}, {}, "adaptive"),
    ({}, {"adaptive": "normuon"}, "adaptive"),
    ({"constraint": "hyperball", "weight_decay": 0.0}, {"weight_decay": 0.0}, "constraint"),
    ({"weight_decay_mode": "cautious"}, {}, "weight_decay_mode"),
])
def test_loading_into_a_differently_configured_optimizer_is_refused(saved, current, key):
    W = nn.Parameter(torch.randn(8, 12))
    opt = mk.Muon([W], **saved)
    W.grad = torch.randn_like(W)
    opt.step()
    other = mk.Muon([W], **current)
    state_before = other.state_dict()
    with pytest.raises(ValueError, match=f"saved with {key}=.*construct the optimizer with {key}="):
        other.load_state_dict(opt.state_dict())
    assert other.state_dict() == state_before


def test_torch_optim_muon_checkpoints_still_load_into_the_default_variant():
    W = nn.Parameter(torch.randn(8, 12))
    ref = torch.optim.Muon([W])
    W.grad = torch.randn_like(W)
    ref.step()
    mk.Muon([W]).load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="saved with adaptive='none'"):
        mk.Muon([W], adaptive="normuon").load_state_dict(ref.state_dict())


def test_tensor_lr_matches_float_lr():
    W0, grads = _data((24, 40))
    results = []
    for lr in (LR, torch.tensor(LR)):
        W = nn.Parameter(W0.clone())
        opt = mk.Muon([W], lr=lr, adaptive="normuon", constraint="hyperball", weight_decay=0.0,
                      ns_dtype=torch.float32)
        for G in grads[:4]:
            W.grad = G.clone()
            opt.step()
        results.append(W.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape, options, old, new", [
    ((16, 24), {"adaptive": "normuon"}, None, "transposed"),  # v per row (16) → per column (24)
    ((3, 8, 20), {"constraint": "hyperball", "weight_decay": 0.0}, "batch", "flatten"),  # 3 radii → 1
    ((3, 8, 20), {"constraint": "hyperball", "weight_decay": 0.0}, "flatten", "batch"),  # 1 radius → 3
])
def test_a_view_change_that_reshapes_variant_state_is_refused_before_anything_changes(shape, options, old, new):
    """matrix_view is a group setting a user may rewrite between steps; the variants' state was made
    for the old view (the Triton statistics kernel would write past the end of a shorter v, and a
    radius vector of the wrong length would set wrong norms): refused at the next step, naming the
    parameter, before anything is modified; resetting the state as the message says steps again."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(shape))
    opt = mk.Muon([{"params": [p], "use_muon": True, "matrix_view": old, **options}], lr=0.02,
                  ns_dtype=torch.float32)
    p.grad = torch.randn(shape)
    opt.step()
    opt.param_groups[0]["matrix_view"] = new
    p.grad = torch.randn(shape)
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=r"parameter #0 of shape .*: its optimizer state '(normuon_v|hyperball_radius)' "
                                         r"has shape .* but its group's current settings"):
        opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in opt.state[p].items())
    del opt.state[p]
    opt.step()
    assert torch.isfinite(p).all()


def test_stale_variant_state_of_a_parameter_that_does_not_step_blocks_nothing():
    """Only the matrices about to step are checked: a frozen parameter (no gradient) keeps its old
    state without stopping the others; it is checked once it steps again."""
    torch.manual_seed(0)
    frozen, live = nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(16, 24))
    opt = mk.Muon([frozen, live], lr=0.02, adaptive="normuon", ns_dtype=torch.float32)
    for p in (frozen, live):
        p.grad = torch.randn(16, 24)
    opt.step()
    frozen.grad = None
    opt.param_groups[0]["matrix_view"] = "transposed"
    opt.state[live].clear()
    live.grad = torch.randn(16, 24)
    opt.step()
    assert opt.state[live]["normuon_v"].shape == (24,)
    frozen.grad = torch.randn(16, 24)
    with pytest.raises(ValueError, match=r"parameter #0 of shape \(16, 24\) \(param group 0\): its optimizer state 'normuon_v'"):
        opt.step()


def test_normuon_beta2_zero_is_allowed_and_hyperball_eps_is_checked():
    mk.Muon([nn.Parameter(torch.randn(4, 4))], adaptive="normuon", normuon_beta2=0.0)  # [0, 1) is documented
    with pytest.raises(ValueError, match="hyperball_eps"):
        mk.Muon([nn.Parameter(torch.randn(4, 4))], constraint="hyperball", weight_decay=0.0, hyperball_eps=0.0)


def test_normuon_on_batch_transposed_experts_is_the_transposed_twin():
    torch.manual_seed(0)
    stored = nn.Parameter(torch.randn(3, 6, 24))  # (E, in, out)
    twin = nn.Parameter(stored.detach().mT.clone())  # (E, out, in)
    opt = mk.Muon([{"params": [stored], "matrix_view": "batch_transposed"}, {"params": [twin], "matrix_view": "batch"}],
                  lr=0.05, weight_decay=0.0, adaptive="normuon", ns_dtype=torch.float32, backend="torch")
    for _ in range(3):
        g = torch.randn(3, 24, 6)
        twin.grad, stored.grad = g, g.mT.clone()
        opt.step()
    assert opt.state[stored]["normuon_v"].shape == opt.state[twin]["normuon_v"].shape == (3, 24)
    torch.testing.assert_close(opt.state[stored]["normuon_v"], opt.state[twin]["normuon_v"], rtol=1e-5, atol=0)
    torch.testing.assert_close(stored.detach().mT, twin.detach(), rtol=0, atol=1e-6)


def test_the_radius_of_bf16_weights_is_accumulated_in_fp32():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(64, 256).to(torch.bfloat16))
    opt = mk.Muon([W], constraint="hyperball", weight_decay=0.0)
    r = W.detach().float().norm()
    W.grad = torch.randn_like(W)
    opt.step()
    torch.testing.assert_close(opt.state[W]["hyperball_radius"], r, rtol=1e-5, atol=0)


def test_turning_on_hyperball_keeps_normuons_state():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(16, 24))
    opt = mk.Muon([W], lr=0.02, adaptive="normuon", weight_decay=0.0, ns_dtype=torch.float32)
    for _ in range(3):
        W.grad = torch.randn(16, 24)
        opt.step()
    v = opt.state[W]["normuon_v"].clone()
    opt.param_groups[0]["constraint"] = "hyperball"
    W.grad = torch.randn(16, 24)
    opt.step()
    assert (opt.state[W]["normuon_v"] >= 0.9 * v).all()  # lerp(v, q, 0.05), not 0.05·q


def test_turning_on_normuon_keeps_an_edited_radius():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(16, 24))
    opt = mk.Muon([W], lr=0.02, constraint="hyperball", weight_decay=0.0, ns_dtype=torch.float32)
    W.grad = torch.randn(16, 24)
    opt.step()
    opt.state[W]["hyperball_radius"].fill_(3.0)
    opt.param_groups[0]["adaptive"] = "normuon"
    W.grad = torch.randn(16, 24)
    opt.step()
    assert float(opt.state[W]["hyperball_radius"]) == 3.0
    torch.testing.assert_close(W.detach().norm(), torch.tensor(3.0), rtol=2e-6, atol=0)
