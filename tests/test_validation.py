"""Bad input gets a clear error and changes nothing; edge-case gradients and parameters work."""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
from torch import nn

import muon_kernels as mk
from oracles import reference_ns, rel_err


def _snapshot(opt):
    return copy.deepcopy([[p.detach().clone() for p in g["params"]] for g in opt.param_groups]), copy.deepcopy(
        {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    )


def _assert_unchanged(before, after):
    """Two ``_snapshot``s hold the same parameters and state, bit for bit."""
    for x, y in zip(before[0], after[0]):
        for p, q in zip(x, y):
            assert torch.equal(p, q)
    assert before[1].keys() == after[1].keys()
    for key in before[1]:
        assert before[1][key].keys() == after[1][key].keys()
        for name in before[1][key]:
            assert torch.equal(before[1][key][name], after[1][key][name]), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr must be a finite number >= 0"),
        ({"lr": float("inf")}, "lr must be a finite number >= 0"),
        ({"lr": torch.tensor([0.1, 0.2])}, "1-element"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0"),
        ({"eps": -1e-7}, "eps must be"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0 .*the usual value is 0.95"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        ({"ns_steps": -1}, r"ns_steps must be an int in \[0, 100\)"),
        ({"ns_steps": 2.5}, r"ns_steps must be an int in \[0, 100\)"),
        ({"ns_steps": 100}, r"ns_steps must be an int in \[0, 100\)"),
        ({"ns_steps": True}, r"ns_steps must be an int in \[0, 100\).*got True"),  # a bool is no step count
        ({"ns_coefficients": "kj"}, r"unknown preset 'kj'.*keller.*polar_express.*quintic"),
        ({"ns_coefficients": (1.0, 2.0)}, "three numbers"),
        ({"ns_coefficients": ("3.4445", "-4.775", "2.0315")}, "three numbers"),  # strings are not converted
        ({"ns_coefficients": [(3.4445, -4.775, "2.0315")]}, r"step 0 must be three numbers"),
        ({"ns_coefficients": []}, "non-empty"),
        ({"adjust_lr_fn": "sqrt"}, r"adjust_lr_fn must be one of \(None, 'original', 'match_rms_adamw', 'spectral'\)"),
        ({"backend": "jax"}, r"backend must be one of \('auto', 'torch', 'triton', 'cuda'\)"),
        ({"backend": "triton"}, "triton backend needs a CUDA tensor, got cpu"),
        ({"ns_dtype": torch.float64}, "ns_dtype must be one of"),
        ({"momentum_dtype": torch.int32}, "momentum_dtype must be None"),
        ({"momentum_form": "heavy"}, r"momentum_form must be one of \('ema', 'sgd'\)"),
        ({"matrix_view": "rows"}, "matrix_view must be one of"),
        ({"nesterov": "yes"}, "nesterov must be True or False"),
        ({"max_workspace_bytes": 0}, "max_workspace_bytes"),
        ({"adamw_lr": -1.0}, "adamw_lr must be a finite number >= 0"),
        ({"adamw_lr": float("inf")}, "adamw_lr must be a finite number >= 0"),
        ({"adamw_betas": (0.9, 1.0)}, r"adamw_betas must be two numbers in \[0, 1\)"),
        ({"adamw_eps": -1.0}, "adamw_eps must be >= 0"),
        ({"adamw_weight_decay": -1.0}, "adamw_weight_decay must be a finite number >= 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.Muon(nn.Linear(4, 6).parameters(), **kwargs)


def test_bad_group_values_are_rejected_and_nothing_is_added():
    opt = mk.Muon([nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(ValueError, match="ns_steps"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))], "ns_steps": -3})
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4))], "use_muon": False, "betas": (2, 0)})
    assert len(opt.param_groups) == 1


def _two_group_optimizer():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(5, 3))
    bias = nn.Parameter(torch.randn(6))
    opt = mk.Muon([{"params": [a, bias]}, {"params": [b], "use_muon": True}], lr=0.05)
    for p in (a, b, bias):
        p.grad = torch.randn_like(p)
    opt.step()  # state exists before the failing step
    return opt, a, b, bias


def test_sparse_gradient_raises_before_anything_changes():
    opt, a, b, bias = _two_group_optimizer()
    for p in (a, bias):
        p.grad = torch.randn_like(p)
    b.grad = torch.randn(5, 3).to_sparse()  # in the last group: earlier groups must be untouched too
    before = _snapshot(opt)
    # the group after the split of the first one ([a] Muon, [bias] AdamW), and a fix
    match = r"param group 2 \(Muon\), parameter #0 of shape \(5, 3\): a sparse gradient, which the Muon half does not support; give"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    after = _snapshot(opt)
    _assert_unchanged(before, after)


def test_complex_parameters_are_rejected_at_construction():
    with pytest.raises(ValueError, match="complex"):
        mk.Muon([nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])


def test_grad_none_is_skipped_without_state_or_decay():
    a, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4, 6))
    opt = mk.Muon([a, b], weight_decay=0.5)
    b0 = b.detach().clone()
    a.grad = torch.randn_like(a)
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state and a in opt.state


def test_grads_are_never_modified():
    ps = [nn.Parameter(torch.randn(8, 5).bfloat16()), nn.Parameter(torch.randn(5, 8))]
    opt = mk.Muon(ps, nesterov=False)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(ps, grads):
            assert torch.equal(p.grad, g)


def test_zero_gradient_applies_only_weight_decay():
    p = nn.Parameter(torch.randn(6, 9))
    p0 = p.detach().clone()
    opt = mk.Muon([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), p0 * (1 - 0.1 * 0.1))


def test_tiny_gradient_still_moves_the_weights_with_eps_zero():
    p = nn.Parameter(torch.randn(6, 9))
    p0 = p.detach().clone()
    opt = mk.Muon([p], lr=0.1, weight_decay=0.0, eps=0.0, momentum=0.0)
    g = torch.randn(6, 9)
    p.grad = g / g.norm() * 1e-9
    opt.step()
    moved = (p.detach() - p0).norm().item()
    p.data.copy_(p0)
    p.grad = g.clone()
    opt.step()
    assert abs(moved - (p.detach() - p0).norm().item()) < 1e-2 * moved


def test_zero_size_parameters_are_skipped():
    empty, p = nn.Parameter(torch.zeros(0, 4)), nn.Parameter(torch.randn(3, 4))
    opt = mk.Muon([empty, p])
    empty.grad, p.grad = torch.zeros(0, 4), torch.randn(3, 4)
    opt.step()
    assert empty not in opt.state and p in opt.state
    assert any(r.method == "skip" for r in opt.plan())


def test_zero_size_adamw_parameters_step_like_torch_adamw():
    """AdamW's half is torch.optim.AdamW's: a zero-size parameter there gets its (empty) moments and
    its step count, as torch's does, so the two state dicts keep the same entries."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 6))
    ours = [nn.Parameter(torch.zeros(0)), nn.Parameter(torch.randn(6))]
    theirs = [nn.Parameter(q.detach().clone()) for q in ours]
    opt = mk.Muon([{"params": [w]}, {"params": ours, "use_muon": False}], backend="torch",
                  adamw_lr=0.01, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, adamw_weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)  # as ours
    for _ in range(2):
        w.grad = torch.randn(4, 6)
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert opt.state[a].keys() == ref.state[b].keys()
        for key, value in ref.state[b].items():
            torch.testing.assert_close(opt.state[a][key], value, rtol=0, atol=0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_and_channels_last_parameters():
    torch.manual_seed(0)
    base = torch.randn(12, 7)
    conv = torch.randn(8, 3, 3, 3)
    grads = [torch.randn(7, 12), torch.randn(8, 3, 3, 3)]
    plain = [nn.Parameter(base.T.contiguous()), nn.Parameter(conv.clone())]
    odd = [nn.Parameter(base.T), nn.Parameter(conv.clone().to(memory_format=torch.channels_last))]
    assert not odd[0].is_contiguous() and not odd[1].is_contiguous()
    for ps in (plain, odd):
        opt = mk.Muon(ps, lr=0.05)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(plain, odd):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_tensor_lr():
    p, q = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4, 4))
    a, b = mk.Muon([p], lr=torch.tensor(0.01)), mk.Muon([q], lr=0.01)
    p.grad = q.grad = torch.eye(4)
    a.step()
    b.step()
    assert torch.equal(p, q)


def test_grad_scaler_skips_inf_steps_and_keeps_momentum():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = mk.Muon(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 8)

    def step(poison):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    step(poison=False)
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    step(poison=True)
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k])
    assert scaler.get_scale() == 2.0**9
    step(poison=False)
    assert not torch.equal(next(model.parameters()), params[0])


def test_fp64_parameters():
    p = nn.Parameter(torch.randn(6, 9, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = mk.Muon([p], lr=0.1, weight_decay=0.0, momentum=0.0, ns_dtype=torch.float32)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float64
    assert rel_err(p.detach() - p0, -0.1 * reference_ns(p.grad)) <= 1e-4


@pytest.mark.parametrize("kwargs", [{"lr": "0.02"}, {"lr": None}, {"weight_decay": "0.1"}, {"momentum": "0.9"},
                                    {"adamw_lr": "1e-3"}, {"adamw_eps": None}, {"adamw_betas": ("0.9", 0.95)}])
def test_settings_that_are_not_numbers_are_refused_at_construction(kwargs):
    """A string lr passed ``float(lr) >= 0`` and failed in the middle of the first step."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name} must be"):
        mk.Muon(nn.Linear(4, 6).parameters(), **kwargs)


@pytest.mark.parametrize("group, key, value, match", [
    (0, "lr", "0.1", "param group 0: lr must be a number"),
    (0, "lr", None, "param group 0: lr must be a number"),
    (0, "lr", float("inf"), "param group 0: lr must be a finite number"),
    (1, "lr", float("inf"), "param group 1: lr must be a finite number"),
    (0, "weight_decay", "x", "param group 0: weight_decay must be a number"),
    (1, "eps", "1e-8", "param group 1: eps must be a number"),
    (0, "use_muon", False, r"param group 0: use_muon changed from True to False.*fixed when it is added"),
    (1, "use_muon", True, r"param group 1: use_muon changed from False to True.*fixed when it is added"),
])
def test_group_edits_that_cannot_step_raise_before_anything_changes(group, key, value, match):
    opt, a, b, bias = _two_group_optimizer()
    for p in (a, b, bias):
        p.grad = torch.randn_like(p)
    before = _snapshot(opt)
    opt.param_groups[group][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    params, state = _snapshot(opt)
    assert all(torch.equal(x, y) for g0, g1 in zip(before[0], params) for x, y in zip(g0, g1))
    assert all(torch.equal(v, state[i][k]) for i, s in before[1].items() for k, v in s.items())


@pytest.mark.parametrize("which", ["muon", "adamw"])
def test_a_parameter_resized_under_its_state_raises_before_anything_changes(which):
    """``p.data = <another shape>`` between steps: the momentum (or AdamW's moments) no longer fit.
    The step refuses before it modifies anything (it stepped the AdamW half, then failed in the
    Muon half; torch's fused CPU AdamW does not check shapes at all)."""
    opt, a, b, bias = _two_group_optimizer()
    target = a if which == "muon" else bias
    target.data = torch.randn(target.shape[0] + 2, *target.shape[1:])
    for p in (a, b, bias):
        p.grad = torch.randn_like(p)
    before = _snapshot(opt)
    key = "momentum_buffer" if which == "muon" else "exp_avg"
    group = next(i for i, g in enumerate(opt.param_groups) if any(p is target for p in g["params"]))
    with pytest.raises(ValueError, match=rf"\(param group {group}\): its optimizer state '{key}' has shape .*now has "
                                         r"shape .*nothing was modified"):
        opt.step()
    params, state = _snapshot(opt)
    assert all(torch.equal(x, y) for g0, g1 in zip(before[0], params) for x, y in zip(g0, g1))
    assert all(torch.equal(v, state[i][k]) for i, s in before[1].items() for k, v in s.items())
    del opt.state[target]  # the fix the message names: the step then runs
    opt.step()


def test_a_groups_params_as_one_tensor_or_a_set_are_taken_like_torch():
    """As torch.optim's add_param_group: one tensor is a list of one (not its rows), and a set is
    refused (its order changes between runs, so state and checkpoints would not line up)."""
    p, q = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(8))
    opt = mk.Muon([{"params": p}, {"params": q, "use_muon": False}])
    assert [g["params"] for g in opt.param_groups] == [[p], [q]]
    p.grad, q.grad = torch.randn(6, 8), torch.randn(8)
    opt.step()
    assert set(opt.state) == {p, q}
    with pytest.raises(TypeError, match="params must be an ordered collection"):
        mk.Muon([{"params": {p, q}}])
    with pytest.raises(TypeError, match="params must be an ordered collection"):
        opt.add_param_group({"params": {nn.Parameter(torch.randn(3, 3))}})
    assert len(opt.param_groups) == 2


def test_a_model_cast_between_steps_steps_in_its_new_dtype():
    """``model.to(torch.bfloat16)`` keeps the Parameter objects and changes their dtype: the next step
    plans anew and steps as a fresh optimizer of the bf16 model that loaded the checkpoint (whose
    momentum torch's load casts to the parameter's dtype, as the step converts it)."""
    torch.manual_seed(0)
    model, twin = nn.Linear(16, 24, bias=False), nn.Linear(16, 24, bias=False)
    opt = mk.Muon(model.parameters(), backend="torch")
    model.weight.grad = torch.randn(24, 16)
    opt.step()
    model.to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    twin.to(torch.bfloat16)
    fresh = mk.Muon(twin.parameters(), backend="torch")
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for seed in range(2):
        model.weight.grad = torch.randn(24, 16, generator=torch.Generator().manual_seed(seed)).bfloat16()
        twin.weight.grad = model.weight.grad.clone()
        opt.step()
        fresh.step()
    assert opt._buckets[0].dtype == torch.bfloat16
    assert torch.equal(model.weight, twin.weight)
    assert torch.equal(opt.state[model.weight]["momentum_buffer"], fresh.state[twin.weight]["momentum_buffer"])


@pytest.mark.parametrize("direction", ["muon to adamw", "adamw to muon"])
def test_a_parameter_moved_between_muon_and_adamw_groups_raises_before_anything_changes(direction):
    """Its state is the other kind's (a momentum buffer in an AdamW group, AdamW's moments in a Muon
    group): refused, named, nothing modified; the fix the message names then steps."""
    torch.manual_seed(0)
    a, c, bias = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(6))
    opt = mk.Muon([{"params": [a], "use_muon": True}, {"params": [c, bias], "use_muon": False}], lr=0.05)
    for p in (a, c, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    moved, source, target = (a, 0, 1) if direction == "muon to adamw" else (c, 1, 0)
    opt.param_groups[source]["params"].remove(moved)
    opt.param_groups[target]["params"].append(moved)
    before = _snapshot(opt)
    kind, marker = ("an AdamW", "momentum_buffer") if direction == "muon to adamw" else ("a Muon", "exp_avg")
    with pytest.raises(ValueError, match=rf"parameter .* is in {kind} group, but its optimizer state is .*'{marker}'"
                                         r".*del optimizer.state\[p\].*nothing was modified"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt))
    del opt.state[moved]
    opt.step()
    assert ("exp_avg" in opt.state[moved]) == (direction == "muon to adamw")


def test_an_empty_group_is_kept_so_later_groups_keep_their_indices():
    """As torch.optim.Muon keeps it: a scheduler's per-group values and a checkpoint's groups line up."""
    w = nn.Parameter(torch.randn(4, 6))
    ours = mk.Muon([{"params": []}, {"params": [w], "lr": 0.05}])
    theirs = torch.optim.Muon([{"params": []}, {"params": [nn.Parameter(w.detach().clone())], "lr": 0.05}])
    assert len(ours.param_groups) == len(theirs.param_groups) == 2 and ours.param_groups[1]["lr"] == 0.05
    w.grad = torch.randn_like(w)
    ours.step()
    again = mk.Muon([{"params": []}, {"params": [nn.Parameter(w.detach().clone())], "lr": 0.05}])
    again.load_state_dict(ours.state_dict())


def test_one_element_tensor_settings_are_numbers():
    """As torch's optimizers take them (a scheduler may keep betas or weight decay as tensors)."""
    t = torch.tensor
    w, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6))
    opt = mk.Muon([{"params": [w], "weight_decay": t(0.01), "momentum": t(0.9)},
                   {"params": [b], "use_muon": False, "betas": (t(0.9), t(0.95)), "weight_decay": t(0.1)}])
    for p in (w, b):
        p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match="betas must be"):
        mk.Muon([w], adamw_betas=(t([0.9, 0.8]), 0.95))


def test_a_checkpoint_without_the_empty_groups_loads():
    """Before empty groups were kept, ``{"params": []}`` was dropped at construction: such a
    checkpoint has exactly the empty groups fewer, and loads with each group's state in place."""
    w = nn.Parameter(torch.randn(4, 6))
    old = mk.Muon([{"params": [w], "lr": 0.05}])
    w.grad = torch.randn_like(w)
    old.step()
    q = nn.Parameter(w.detach().clone())
    new = mk.Muon([{"params": []}, {"params": [q], "lr": 0.05}])
    new.load_state_dict(old.state_dict())
    assert len(new.param_groups) == 2 and new.param_groups[0]["params"] == []
    assert torch.equal(new.state[q]["momentum_buffer"], old.state[w]["momentum_buffer"])


@pytest.mark.parametrize("case", ["fp64 gradient of an fp32 bias", "bias converted after its state was made",
                                  "integer gradient of a matrix", "complex gradient of a matrix",
                                  "integer parameter in an AdamW group"])
def test_a_gradient_or_state_of_the_wrong_dtype_is_refused_before_anything_changes(case):
    """torch's AdamW would step the group's first parameters (and advance every step counter) before
    failing on a mismatched dtype; a Muon matrix would cast an integer gradient silently."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    opt = mk.Muon(model.parameters(), lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    biases = [model[0].bias, model[1].bias]
    if case == "fp64 gradient of an fp32 bias":
        biases[1].grad.data = biases[1].grad.data.double()  # (torch refuses the plain assignment)
        match = r"param group 1 \(AdamW\), parameter #1 of shape \(3,\): gradient dtype torch.float64 != parameter dtype torch.float32"
    elif case == "bias converted after its state was made":
        biases[1].data = biases[1].data.double()
        biases[1].grad = None
        biases[1].grad = torch.randn_like(biases[1])
        match = r"state 'exp_avg' is torch.float32, but the parameter is now torch.float64"
    elif case == "integer parameter in an AdamW group":  # torch's AdamW fails in its lerp, its state made
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)],
                             "use_muon": False})
        opt.param_groups[-1]["params"][0].grad = torch.ones(3, dtype=torch.int64)
        match = r"param group 2 \(AdamW\), parameter #0 of shape \(3,\): AdamW needs a floating-point \(or complex\) gradient, got torch.int64"
    elif case == "integer gradient of a matrix":
        model[1].weight.grad.data = torch.ones(3, 8, dtype=torch.int64)
        match = r"Muon needs a floating-point gradient, got torch.int64"
    else:
        model[1].weight.grad.data = torch.ones(3, 8, dtype=torch.complex64)
        match = r"param group 0 \(Muon\), parameter #1 of shape \(3, 8\): Muon does not support complex gradients"
    before = _snapshot(opt)
    with pytest.raises((ValueError, RuntimeError), match=match):
        opt.step()
    after = _snapshot(opt)
    _assert_unchanged(before, after)
    if case == "bias converted after its state was made":  # the fix the message gives works
        opt.load_state_dict(opt.state_dict())
        opt.step()
        assert opt.state[biases[1]]["exp_avg"].dtype == torch.float64


def test_a_group_with_param_names_is_split_with_its_names():
    """A group copied from another optimizer's param_groups carries ``param_names``; each half keeps
    its own parameters' names (the messages, plan() and state_dict name the right tensor)."""
    model = nn.Linear(4, 8)
    opt = mk.Muon([{"params": [model.weight, model.bias], "param_names": ["weight", "bias"]}], lr=0.02)
    assert [g["param_names"] for g in opt.param_groups] == [["weight"], ["bias"]]
    model.bias.grad = torch.zeros(8)
    model.bias.grad.data = torch.zeros(3)  # (torch refuses the plain assignment)
    with pytest.raises(RuntimeError, match=r"param group 1 \(AdamW\), parameter 'bias': gradient shape \(3,\)"):
        opt.step()


def test_an_adamw_groups_capturable_is_validated_when_rewritten():
    model = nn.Linear(4, 8)
    opt = mk.Muon(model.parameters(), lr=0.02)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.param_groups[1]["capturable"] = "yes"
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 1: capturable must be True or False, got 'yes'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before[0][1], opt.param_groups[1]["params"]))


@pytest.mark.parametrize("group, key, value, match", [
    (1, "split_sizes", (4, 4), r"param group 1: parameter #0 of shape \(12, 8\): split_sizes \(4, 4\) sum to 8"),
    (1, "num_heads", 5, r"param group 1: parameter #0 of shape \(12, 8\): num_heads=5 does not divide"),
    (0, "matrix_view", "rows", r"param group 0: matrix_view must be one of"),
    (0, "backend", "cuda", r"param group 0: backend='cuda' cannot run on cpu"),
])
def test_a_setting_that_fits_no_parameter_names_its_group_and_changes_nothing(group, key, value, match):
    """Settings checked against the parameters when the step is planned (splits, views, the
    backend) name the group too, and leave everything as it was."""
    torch.manual_seed(0)
    a, b, bias = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(8))
    opt = mk.Muon([{"params": [a]}, {"params": [b]}, {"params": [bias], "use_muon": False}], lr=0.02)
    for p in (a, b, bias):
        p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[group][key] = value
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match + r".*nothing was modified"):
        opt.step()
    after = _snapshot(opt)
    _assert_unchanged(before, after)


def test_a_triton_older_than_the_kernels_need_is_refused_with_the_fix(monkeypatch):
    """torch 2.9 pins triton 3.5, whose PTX and launcher internals differ from what the kernels rely
    on (its run of this suite failed the interpreter, PTX and launch tests): backend='triton' is
    refused, naming the version and the fix, before anything changes; 3.6 is accepted."""
    import triton

    from muon_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the Triton backend runs on this CPU
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert backends._triton_status(torch.device("cpu"))[0]
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    fix = r"triton 3\.5\.1 is older than the 3\.6 the kernels need: pip install 'triton>=3\.6'"
    assert backends._triton_status(torch.device("cpu")) == (False, fix.replace("\\", "") + " (torch 2.10 and later pin one)")
    W = nn.Parameter(torch.randn(8, 16))
    W.grad = torch.randn_like(W)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run on cpu: " + fix):
        mk.Muon([W], lr=0.02, backend="triton")
    opt = mk.Muon([W], lr=0.02)
    opt.step()
    opt.param_groups[0]["backend"] = "triton"
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param group 0: backend='triton' cannot run on cpu: " + fix +
                       r".*nothing was modified"):
        opt.step()
    _assert_unchanged(before, _snapshot(opt))
    with pytest.raises(ValueError, match=fix):
        mk.orthogonalize(W.grad, backend="triton")


@pytest.mark.parametrize("named", [False, True])
def test_a_parameter_listed_twice_in_a_group_is_refused(named):
    """torch.optim warns that this will become an error and steps such a parameter twice (momentum
    updated between the two); ours would update both copies' momentum first: refused, naming it."""
    W, other = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3, 3))
    params = [("w", W), ("w_again", W)] if named else [W, W]
    with pytest.raises(ValueError, match=r"parameter (of shape \(4, 4\)|'w_again') is listed twice in one param "
                                         r"group \(positions 0 and 1\): list it once"):
        mk.Muon(params)
    opt = mk.Muon([("other", other)] if named else [other])
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": params})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("group, key, value", [(1, "amsgrad", 0), (0, "nesterov", 1), (0, "ns_steps", 5.0),
                                               (0, "capturable", 0)])
def test_a_setting_rewritten_as_an_equal_value_of_another_type_is_checked_again(group, key, value):
    """Python has 0 == False and 5.0 == 5: such a rewrite was taken for no change, so it was never
    checked, and failed in the middle of the step (AdamW's fused kernel refused amsgrad=0 after the
    stochastic-rounding counters had advanced) or was saved into a checkpoint nobody could load."""
    def build():
        torch.manual_seed(0)
        a, bias = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(6))
        return mk.Muon([{"params": [a]}, {"params": [bias], "use_muon": False}], lr=0.05, backend="torch",
                       momentum_dtype=torch.bfloat16, momentum_rounding="stochastic"), a, bias

    def step(opt, a, bias, seed):
        g = torch.Generator().manual_seed(seed)
        a.grad, bias.grad = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
        opt.step()

    opt, a, bias = build()
    twin, a2, bias2 = build()
    for seed in (1, 2):
        step(opt, a, bias, seed)
        step(twin, a2, bias2, seed)
    before = _snapshot(opt)
    correct = opt.param_groups[group][key]
    opt.param_groups[group][key] = value
    with pytest.raises(ValueError, match=rf"param group {group}: {key} must be.*nothing was modified"):
        step(opt, a, bias, 3)
    _assert_unchanged(before, _snapshot(opt))
    opt.param_groups[group][key] = correct
    step(opt, a, bias, 3)
    step(twin, a2, bias2, 3)
    for p, q in ((a, a2), (bias, bias2)):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == twin.state[q].keys()
        assert all(torch.equal(v, twin.state[q][k]) for k, v in opt.state[p].items())


@pytest.mark.parametrize("value", [None, "False", 1])
def test_use_muon_must_be_a_bool(value):
    """use_muon=None read as "decide for me" but sent every matrix to AdamW; "False" sent them to Muon."""
    opt = mk.Muon([nn.Parameter(torch.randn(4, 6))])
    with pytest.raises(ValueError, match=r"use_muon must be True \(Muon\) or False \(AdamW\), or left out"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(5, 3))], "use_muon": value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("key, value, fix", [("adamw_lr", 1e-2, "use_muon=False and its own lr"),
                                             ("cuda_graph", True, r"pass cuda_graph to Muon\(...\)"),
                                             ("max_workspace_bytes", 2**20, r"pass max_workspace_bytes to Muon")])
def test_an_optimizer_wide_setting_in_a_group_is_refused(key, value, fix):
    """A group's adamw_lr was accepted and ignored: its AdamW half stepped at the default lr."""
    w, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=rf"{key} is an optimizer-wide setting, not a param group's: .*{fix}"):
        mk.Muon([{"params": [w, b], key: value}])
    opt = mk.Muon([w])
    with pytest.raises(ValueError, match=rf"{key} is an optimizer-wide setting"):
        opt.add_param_group({"params": [b], key: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("how", ["deepcopy", "deepcopy of an older copy", "load_state_dict"])
def test_a_groups_kind_stays_fixed_in_a_copy(how):
    """Also after a load (torch makes new group dicts) and in a copy pickled when the records were
    the settings keys alone."""
    opt, a, b, bias = _two_group_optimizer()
    if how == "load_state_dict":
        twin = opt
        twin.load_state_dict(opt.state_dict())
    else:
        if how == "deepcopy of an older copy":
            opt._validated = {gi: key for gi, (_, key) in opt._validated.items()}
        twin = copy.deepcopy(opt)
    twin.param_groups[1]["use_muon"] = True  # the bias's AdamW half
    with pytest.raises(ValueError, match="param group 1: use_muon changed from False to True"):
        twin.step()


def test_an_adamw_group_holds_adamw_keys_and_momentum_cycling_still_works():
    """An AdamW group carried every Muon default (momentum=0.95 beside its betas, ns_coefficients,
    ...), so its settings read as Muon's; now AdamW's keys, and any the caller gave it, only.
    OneCycleLR's momentum cycling writes ``momentum`` into it (unread: its beta1 stays betas[0])."""
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    opt = mk.Muon(list(model.named_parameters()), lr=0.02)
    opt.add_param_group({"params": [("scale", nn.Parameter(torch.randn(3)))], "use_muon": False, "note": "extra"})
    muon, adamw, extra = opt.param_groups
    assert set(adamw) == {"params", "param_names", "use_muon", "lr", "betas", "eps", "weight_decay", "amsgrad",
                          "maximize", "capturable"}
    assert set(extra) == set(adamw) | {"note"}
    assert {"momentum", "nesterov", "ns_coefficients", "ns_steps"} <= set(muon)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 3e-4, 3e-4], total_steps=10, base_momentum=0.8,
                                                max_momentum=0.9)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert muon["momentum"] == adamw["momentum"] < 0.9 and adamw["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("edit", ["delete the first", "reverse", "delete in a copy"])
def test_groups_deleted_or_reordered_by_hand_step_as_torch_steps_them(edit):
    """torch's optimizers step whatever param_groups holds: a group deleted (stop training some
    parameters) or the list reordered steps the groups that are there; a group's kind stays fixed
    wherever it moved to."""
    opt, a, b, bias = _two_group_optimizer()  # groups: Muon [a], AdamW [bias], Muon [b]
    if edit == "delete in a copy":
        opt = copy.deepcopy(opt)
        a, bias, b = (g["params"][0] for g in opt.param_groups)
    if edit == "reverse":
        opt.param_groups.reverse()
    else:
        del opt.param_groups[0]
    frozen = a.detach().clone()
    for p in (a, b, bias):
        p.grad = torch.randn_like(p)
    before = {p: p.detach().clone() for p in (b, bias)}
    opt.step()
    assert all(not torch.equal(p, before[p]) for p in (b, bias))
    assert torch.equal(a, frozen) == (edit != "reverse")
    adamw = next(i for i, g in enumerate(opt.param_groups) if g["params"][0] is bias)
    opt.param_groups[adamw]["use_muon"] = True
    with pytest.raises(ValueError, match=rf"param group {adamw}: use_muon changed from False to True"):
        opt.step()


@pytest.mark.parametrize("kwargs", [{"momentum": Fraction(9, 10)}, {"adamw_lr": Fraction(1, 1000)},
                                    {"adamw_betas": (Fraction(9, 10), 0.95)}, {"lr": Fraction(1, 50)},
                                    {"eps": Fraction(1, 10**7)}, {"ns_coefficients": ("3.4445", "-4.775", "2.0315")},
                                    {"normuon_beta2": Fraction(1, 2), "adaptive": "normuon"}])
def test_numbers_torch_cannot_take_are_refused_at_construction(kwargs):
    """A Fraction passed the check (numbers.Real) and failed inside a torch op in the middle of a step."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name}.* must be"):
        mk.Muon(nn.Linear(4, 6).parameters(), **kwargs)


def test_numpy_scalars_are_numbers_for_every_setting():
    """np.float32 was taken for lr and refused for eps, normuon_beta2 and ns_coefficients."""
    import numpy as np
    values = {"lr": 0.02, "momentum": 0.9, "eps": 1e-7, "normuon_beta2": 0.9, "normuon_eps": 1e-10,
              "adamw_lr": 1e-3, "adamw_betas": (0.9, 0.95)}
    as_numpy = {k: tuple(map(np.float32, v)) if isinstance(v, tuple) else np.float32(v) for k, v in values.items()}
    as_float = {k: tuple(map(float, v)) if isinstance(v, tuple) else float(v) for k, v in as_numpy.items()}
    coefficients = (3.4445, -4.775, 2.0315)
    results = []
    for kwargs, coeffs in ((as_numpy, tuple(map(np.float32, coefficients))),
                           (as_float, tuple(float(np.float32(c)) for c in coefficients))):
        torch.manual_seed(0)
        model = nn.Linear(6, 5)
        opt = mk.Muon(model.parameters(), adaptive="normuon", ns_coefficients=coeffs, backend="torch", **kwargs)
        for _ in range(2):
            model(torch.randn(3, 6)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_a_tensor_lr_replaced_by_another_tensor_is_checked_again():
    p = torch.nn.Parameter(torch.randn(4, 8))
    p.grad = torch.randn(4, 8)
    opt = mk.Muon([p], lr=torch.tensor(0.01), backend="torch")
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(float("nan"))
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()
    assert torch.equal(p, before)


def test_adamw_settings_at_their_edges():
    """Three betas and an infinite decay are refused by name; eps = 0 is accepted, as torch's AdamW does."""
    with pytest.raises(ValueError, match="betas must be two numbers"):
        mk.Muon([torch.nn.Parameter(torch.randn(4, 8))], adamw_betas=(0.9, 0.95, 0.99))
    with pytest.raises(ValueError, match="adamw_weight_decay must be a finite"):
        mk.Muon([torch.nn.Parameter(torch.randn(4, 8))], adamw_weight_decay=float("inf"))
    b = torch.nn.Parameter(torch.randn(8))
    b.grad = torch.randn(8)
    mk.Muon([b], adamw_eps=0.0, backend="torch").step()


def test_a_group_appended_by_hand_without_defaults_names_what_it_lacks():
    p, q = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(4, 8))
    p.grad, q.grad = torch.randn(4, 8), torch.randn(4, 8)
    opt = mk.Muon([p], backend="torch")
    opt.param_groups.append({"params": [q], "use_muon": True, "lr": 0.02})
    with pytest.raises(ValueError, match="param group 1 has use_muon=True but no"):
        opt.step()
