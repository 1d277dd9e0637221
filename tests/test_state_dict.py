"""state_dict: interchange with torch.optim.Muon both ways, exact resume, weights_only loading."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import muon_kernels as mk


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24), torch.nn.LayerNorm(24))
    return model.to(dtype)


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


def _assert_same(model, opt, twin_model, twin):
    """Parameters and every state tensor equal, bit for bit."""
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
        assert opt.state[a].keys() == twin.state[b].keys()
        for key, value in opt.state[a].items():
            assert torch.equal(value, twin.state[b][key]), key


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "dtype, momentum_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)]
)
def test_resume_is_bit_identical(dtype, momentum_dtype):
    kwargs = dict(lr=0.02, momentum_dtype=momentum_dtype, ns_coefficients="quintic", adamw_weight_decay=0.01)
    straight = _model(dtype)
    opt = mk.Muon(straight.parameters(), **kwargs)
    _train(straight, opt, 3, seed=1)
    _train(straight, opt, 3, seed=2)

    first = _model(dtype)
    opt1 = mk.Muon(first.parameters(), **kwargs)
    _train(first, opt1, 3, seed=1)
    saved_model, saved_opt = _roundtrip(first.state_dict()), _roundtrip(opt1.state_dict())

    resumed = _model(dtype, seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = mk.Muon(resumed.parameters(), **kwargs)
    opt2.load_state_dict(saved_opt)
    for p in resumed.parameters():
        if p.ndim >= 2:
            assert opt2.state[p]["momentum_buffer"].dtype == (momentum_dtype or dtype)
    _train(resumed, opt2, 3, seed=2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


@pytest.mark.parametrize("old, new", [(None, "int8"), ("int8", torch.float32), ("int8", torch.bfloat16),
                                      (torch.float32, torch.bfloat16)])
def test_a_checkpoint_saved_after_a_momentum_dtype_change_resumes_bit_identically(old, new):
    """A buffer takes a changed momentum_dtype at its parameter's next step with a gradient. A
    checkpoint saved before that (right after the change, or after a step without that gradient)
    holds the old dtype (int8 with its scales); loading converts it as that step would have."""
    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02, momentum_dtype=old)
    _train(model, opt, 2, seed=1)
    opt.param_groups[0]["momentum_dtype"] = new
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    model[0].weight.grad = None  # this matrix keeps its old buffer through the step
    opt.step()
    assert opt.state[model[0].weight]["momentum_buffer"].dtype != opt.state[model[2].weight]["momentum_buffer"].dtype
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())

    resumed = _model(seed=99)
    resumed.load_state_dict(saved_model)
    opt2 = mk.Muon(resumed.parameters(), lr=0.02, momentum_dtype=old)
    opt2.load_state_dict(saved_opt)
    _train(model, opt, 2, seed=2)
    _train(resumed, opt2, 2, seed=2)
    _assert_same(model, opt, resumed, opt2)


def test_an_int8_momentum_without_its_scales_is_refused():
    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02, momentum_dtype="int8")
    _train(model, opt, 1, seed=1)
    saved = opt.state_dict()
    for state in saved["state"].values():
        state.pop("momentum_scale", None)
    fresh = mk.Muon(model.parameters(), lr=0.02, momentum_dtype="int8")
    with pytest.raises(ValueError, match=r"param group 0, parameter #0 of shape \(24, 12\): saved int8 'momentum_buffer' "
                                         r"without its block scales"):
        fresh.load_state_dict(saved)
    assert not fresh.state


def test_group_settings_survive_weights_only_roundtrip():
    model = _model()
    opt = mk.Muon(model.parameters(), ns_coefficients=[(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)], ns_dtype=torch.float16,
                  momentum_dtype=torch.float32, momentum_form="sgd", adjust_lr_fn="spectral", lr=torch.tensor([0.01]))
    _train(model, opt, 1, seed=0)
    loaded = _roundtrip(opt.state_dict())
    fresh = mk.Muon(model.parameters())
    fresh.load_state_dict(loaded)
    for g_old, g_new in zip(opt.param_groups, fresh.param_groups):
        assert set(g_old) == set(g_new)
        for key in g_old:
            if key != "params":
                assert str(g_old[key]) == str(g_new[key]), key


def test_torch_optim_muon_state_loads_into_ours_and_back():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 12) * 0.3) for _ in range(3)]
    theirs = torch.optim.Muon(weights, lr=0.03, momentum=0.9)
    for _ in range(2):
        for w in weights:
            w.grad = torch.randn_like(w)
        theirs.step()
    saved = _roundtrip(theirs.state_dict())

    ours = mk.Muon([torch.nn.Parameter(w.detach().clone()) for w in weights], backend="torch", ns_dtype=torch.float32)
    ours.load_state_dict(saved)
    group = ours.param_groups[0]
    # torch's values win; keys torch does not have keep ours.
    assert group["lr"] == 0.03 and group["momentum"] == 0.9
    assert group["use_muon"] is True and group["ns_dtype"] == torch.float32 and group["backend"] == "torch"
    for p, w in zip(group["params"], weights):
        assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[w]["momentum_buffer"])

    back = torch.optim.Muon([torch.nn.Parameter(w.detach().clone()) for w in weights])
    back.load_state_dict(_roundtrip(ours.state_dict()))
    assert back.param_groups[0]["lr"] == 0.03
    for p, w in zip(back.param_groups[0]["params"], weights):
        assert torch.equal(back.state[p]["momentum_buffer"], theirs.state[w]["momentum_buffer"])
        p.grad = torch.ones_like(p)
    back.step()  # torch.optim.Muon steps with our group keys present


def test_missing_group_keys_get_this_optimizers_values():
    model = _model()
    opt = mk.Muon(model.parameters(), momentum_form="sgd")
    _train(model, opt, 1, seed=0)
    old = opt.state_dict()
    for group in old["param_groups"]:  # (an AdamW group has no momentum_form)
        group.pop("momentum_form", None)
        del group["use_muon"]
    fresh = mk.Muon(model.parameters(), momentum_form="sgd")
    fresh.load_state_dict(old)
    assert [g["use_muon"] for g in fresh.param_groups] == [True, False]
    assert fresh.param_groups[0]["momentum_form"] == "sgd"
    _train(model, fresh, 1, seed=1)


def test_routing_reasons_stay_out_of_checkpoints_and_older_ones_load_cleanly():
    """param_groups()' reasons are plan() metadata: not saved (torch.distributed.checkpoint stored
    each as an item, once per parameter of its group, with a flattened optimizer state dict). A
    checkpoint that saved them (as a list), with AdamW groups carrying the Muon defaults, loads:
    the live reasons stay and the AdamW group holds AdamW's keys."""
    model = _model()
    opt = mk.Muon(mk.param_groups(model), lr=0.02)
    _train(model, opt, 1, seed=0)
    saved = opt.state_dict()
    assert all("param_reasons" not in g and "routing_notes" not in g for g in saved["param_groups"])
    reasons = [dict(g["param_reasons"]) for g in opt.param_groups]
    adamw_keys = [set(g) for g in opt.param_groups]
    older = copy.deepcopy(saved)
    for g, live in zip(older["param_groups"], opt.param_groups):
        g["param_reasons"] = list(live["param_reasons"].values())
        if not g["use_muon"]:
            g.update(momentum=0.95, nesterov=True, ns_steps=5, ns_coefficients=(3.4445, -4.775, 2.0315))
    fresh = mk.Muon(mk.param_groups(model), lr=0.02)
    fresh.load_state_dict(_roundtrip(older))
    assert [g["param_reasons"] for g in fresh.param_groups] == reasons
    assert [set(g) for g in fresh.param_groups] == adamw_keys
    _train(model, fresh, 1, seed=1)


def test_a_torch_adamw_checkpoint_is_refused_by_a_muon_group():
    """An AdamW run resumed with Muon (group counts alike): the AdamW-style group (betas, no
    momentum) was taken for a Muon one, its lr and moments loaded into the Muon group."""
    model = _model()
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    adamw = torch.optim.AdamW([{"params": matrices}, {"params": rest, "weight_decay": 0.0}], lr=5e-5)
    _train(model, adamw, 1, seed=0)
    ours = mk.Muon(model.parameters(), lr=0.02)
    before = [dict(g) for g in ours.param_groups]
    with pytest.raises(ValueError, match=r"param group 0: it is a torch optimizer's AdamW-style group \(betas, no "
                                         r"momentum\), this optimizer's group has use_muon=True.*nothing was loaded"):
        ours.load_state_dict(_roundtrip(adamw.state_dict()))
    assert not ours.state and [dict(g) for g in ours.param_groups] == before
    # its AdamW half loads into an AdamW group, as torch.optim.AdamW's own checkpoint would
    half = torch.optim.AdamW(rest, lr=3e-4)
    _train(model, half, 1, seed=1)
    both = mk.Muon([{"params": matrices, "use_muon": True}, {"params": rest, "use_muon": False}], lr=0.02)
    state = both.state_dict()
    state["param_groups"][1] = {**half.state_dict()["param_groups"][0], "params": state["param_groups"][1]["params"]}
    state["state"] = {state["param_groups"][1]["params"][i]: v for i, v in half.state_dict()["state"].items()}
    both.load_state_dict(state)
    assert both.param_groups[1]["lr"] == 3e-4 and torch.equal(both.state[rest[0]]["exp_avg"],
                                                               half.state[rest[0]]["exp_avg"])


def test_a_torch_optim_muon_checkpoint_into_a_split_group_explains_the_split():
    """The common migration: torch.optim.Muon over the matrices, then one Muon over all parameters
    (split at construction into a Muon and an AdamW group). The group counts differ; the message
    says why and how to build the optimizer so it loads, and nothing is loaded."""
    model = _model()
    weights = [p for p in model.parameters() if p.ndim == 2]
    theirs = torch.optim.Muon(weights, lr=0.03)
    _train(model, theirs, 2, seed=1)
    ours = mk.Muon(model.parameters(), lr=0.03)
    before = [dict(g) for g in ours.param_groups]
    with pytest.raises(ValueError, match=r"has 1 parameter groups, this optimizer has 2 \(Muon, AdamW\): a group given "
                                         r"without use_muon is split at construction.*nothing was loaded"):
        ours.load_state_dict(theirs.state_dict())
    assert not ours.state and [dict(g) for g in ours.param_groups] == before
    fixed = mk.Muon(weights, lr=0.03)  # the recipe the message gives
    fixed.load_state_dict(theirs.state_dict())
    fixed.add_param_group({"params": [p for p in model.parameters() if p.ndim < 2], "use_muon": False})
    assert all(torch.equal(fixed.state[w]["momentum_buffer"], theirs.state[w]["momentum_buffer"]) for w in weights)
    _train(model, fixed, 1, seed=2)  # every parameter steps, the AdamW ones from fresh state
    assert all("exp_avg" in fixed.state[p] for p in model.parameters() if p.ndim < 2)


def test_our_default_checkpoint_steps_in_torch_optim_muon_like_torchs_own():
    """Our default ``ns_steps=None`` is saved as the count it stands for (5), which torch.optim.Muon
    reads as an int: loaded there, it steps exactly as torch's own checkpoint of the same run does."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 12) * 0.3) for _ in range(2)]
    ours = mk.Muon([torch.nn.Parameter(w.detach().clone()) for w in weights], lr=0.03)
    theirs = torch.optim.Muon([torch.nn.Parameter(w.detach().clone()) for w in weights], lr=0.03)
    assert ours.param_groups[0]["ns_steps"] is None
    saved = _roundtrip(ours.state_dict())
    assert saved["param_groups"][0]["ns_steps"] == 5 == theirs.param_groups[0]["ns_steps"]
    mine = mk.Muon([torch.nn.Parameter(w.detach().clone()) for w in weights], lr=0.03)
    mine.load_state_dict(saved)  # and back into ours: the same 5 steps
    loaded = torch.optim.Muon([torch.nn.Parameter(w.detach().clone()) for w in weights])
    loaded.load_state_dict(saved)
    for opt in (loaded, theirs):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
    for p, q in zip(loaded.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        assert torch.equal(p, q)
    # Back from torch: still our None where torch kept the count, torch's value where it changed it.
    back = mk.Muon([torch.nn.Parameter(w.detach().clone()) for w in weights])
    back.load_state_dict(_roundtrip(loaded.state_dict()))
    assert back.param_groups[0]["ns_steps"] is None and "ns_steps_setting" not in back.param_groups[0]
    loaded.param_groups[0]["ns_steps"] = 3
    back.load_state_dict(_roundtrip(loaded.state_dict()))
    assert back.param_groups[0]["ns_steps"] == 3


def _layouts(shapes, **kwargs):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = mk.Muon(params, lr=0.02, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def _state(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("saved_shapes, shapes, key", [
    ([(8, 16), (16,)], [(8, 16), (64,)], "exp_avg"),  # a resized bias (torch's fused CPU AdamW corrupted memory)
    ([(8, 16), (16,)], [(16, 8), (16,)], "momentum_buffer"),  # a transposed weight
])
def test_a_checkpoint_of_another_layout_is_refused_at_load(saved_shapes, shapes, key):
    """Each saved state tensor must have the shape this optimizer would give its parameter: a
    mismatch raises at load, naming the parameter and the state, and nothing is loaded."""
    saved = _roundtrip(_layouts(saved_shapes).state_dict())
    opt = _layouts(shapes)
    before = _state(opt)
    with pytest.raises(ValueError, match=rf"saved '{key}' has shape .*nothing was loaded"):
        opt.load_state_dict(saved)
    after = _state(opt)
    assert before.keys() == after.keys()
    assert all(torch.equal(v, after[i][k]) for i, s in before.items() for k, v in s.items())


@pytest.mark.parametrize("key, kwargs", [
    ("momentum_scale", {"momentum_dtype": "int8"}),
    ("normuon_v", {"adaptive": "normuon"}),
    ("hyperball_radius", {"constraint": "hyperball", "weight_decay": 0.0}),
])
def test_a_variant_state_of_the_wrong_shape_is_refused_at_load(key, kwargs):
    """The low-precision scales and the variants' state are checked against the shapes the optimizer
    makes for them (a wrong-sized v or radius would be read out of bounds by the fused kernels)."""
    opt = _layouts([(8, 16), (32, 8)], **kwargs)
    saved = _roundtrip(opt.state_dict())
    good = saved["state"][1][key]
    saved["state"][1][key] = torch.zeros(tuple(good.shape) + (2,), dtype=good.dtype)
    with pytest.raises(ValueError, match=rf"parameter #1 of shape \(32, 8\): saved '{key}' has shape"):
        _layouts([(8, 16), (32, 8)], **kwargs).load_state_dict(saved)
    saved["state"][1][key] = good
    _layouts([(8, 16), (32, 8)], **kwargs).load_state_dict(saved)  # the right shapes load


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_like_the_original(how):
    """torch's ``Optimizer.__getstate__`` keeps only defaults, state and param_groups: a copy made
    through it alone could not step (the constructor's options and caches were gone)."""
    import copy
    import pickle

    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02, adamw_lr=1e-3, max_workspace_bytes=2**20, ns_coefficients="quintic")
    _train(model, opt, 2, seed=1)
    if how == "deepcopy":
        twin_model, twin = copy.deepcopy((model, opt))
    elif how == "pickle":
        twin_model, twin = pickle.loads(pickle.dumps((model, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        twin_model, twin = torch.load(buffer, weights_only=False)
    assert twin.max_workspace_bytes == 2**20 and twin._adamw_defaults == opt._adamw_defaults
    assert twin.plan() == opt.plan()
    _train(model, opt, 2, seed=2)
    _train(twin_model, twin, 2, seed=2)
    _assert_same(model, opt, twin_model, twin)
    twin.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})  # reads the AdamW defaults
    assert twin.param_groups[-1]["lr"] == 1e-3


def test_load_hooks_run_around_the_whole_load():
    """As torch runs them: a pre-hook sees the dict first (and the dict it returns is the one checked
    and loaded, so it can fix an old checkpoint's layout); a post-hook runs after everything, so
    state it sets stays."""
    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02)
    _train(model, opt, 2, seed=1)
    saved = _roundtrip(opt.state_dict())
    matrix = next(p for p in model.parameters() if p.ndim == 2)
    pid = next(i for i, p in enumerate(opt.param_groups[0]["params"]) if p is matrix)
    good = saved["state"][pid]["momentum_buffer"]
    saved["state"][pid]["momentum_buffer"] = good.t().contiguous()  # an old layout, (in, out)
    calls = []

    def fix_layout(optimizer, state_dict):
        calls.append("pre")
        fixed = dict(state_dict, state={k: dict(v) for k, v in state_dict["state"].items()})
        fixed["state"][pid]["momentum_buffer"] = fixed["state"][pid]["momentum_buffer"].t()
        return fixed

    fresh_model = _model()
    fresh = mk.Muon(fresh_model.parameters(), lr=0.02)
    with pytest.raises(ValueError, match="saved 'momentum_buffer' has shape"):
        fresh.load_state_dict(saved)  # without the hook: refused
    fresh.register_load_state_dict_pre_hook(fix_layout)
    fresh_matrix = next(p for p in fresh_model.parameters() if p.ndim == 2)
    fresh.register_load_state_dict_post_hook(lambda o: (calls.append("post"),
                                                        o.state[fresh_matrix]["momentum_buffer"].zero_()))
    fresh.load_state_dict(saved)
    assert calls == ["pre", "post"]
    assert torch.count_nonzero(fresh.state[fresh_matrix]["momentum_buffer"]) == 0  # the post-hook's write stayed
    # with a pre-hook that returns nothing, the loaded values are the saved ones
    calls.clear()
    saved["state"][pid]["momentum_buffer"] = good
    plain = mk.Muon(_model().parameters(), lr=0.02)
    plain.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre"))
    plain.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    plain.load_state_dict(saved)
    assert calls == ["pre", "post"]
    loaded = plain.state[plain.param_groups[0]["params"][pid]]["momentum_buffer"]
    assert torch.equal(loaded, good)


def test_hooks_see_what_torch_would_show_them():
    """A state_dict post-hook sees (and may replace) the dict state_dict() returns — ns_steps as a
    count, dtypes by name; a load pre-hook that edits the dict in place leaves the caller's alone."""
    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02)
    _train(model, opt, 1, seed=1)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append((sd["param_groups"][0]["ns_steps"],
                                                                 sd["param_groups"][0]["ns_dtype"])))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "replaced"})
    saved = opt.state_dict()
    assert seen == [(5, "bfloat16")] and saved["note"] == "replaced"
    del saved["note"]
    fresh = mk.Muon(_model().parameters(), lr=0.02)
    fresh.register_load_state_dict_pre_hook(lambda o, sd: sd.update(param_groups=[dict(g) for g in sd["param_groups"]],
                                                                     extra=1))
    fresh.load_state_dict(saved)
    assert "extra" not in saved


@pytest.mark.parametrize("changed_to", ["int8", torch.bfloat16])
def test_a_momentum_dtype_changed_and_changed_back_before_the_parameter_steps_resumes_bit_identically(changed_to):
    """fp32 → int8 (or bf16) while a matrix has no gradient, a checkpoint, then back to fp32: the
    straight run never converts that buffer. Loading converted it at once (fp32 → int8), and the step
    after the change back converted it again (int8 → fp32), losing precision the straight run kept."""
    def run(resume: bool):
        model = _model()
        opt = mk.Muon(model.parameters(), lr=0.02)
        _train(model, opt, 2, seed=1)
        opt.param_groups[0]["momentum_dtype"] = changed_to
        opt.zero_grad()
        model(torch.randn(16, 12, generator=torch.Generator().manual_seed(5))).pow(2).mean().backward()
        model[0].weight.grad = None  # this matrix keeps its fp32 buffer through the step
        opt.step()
        if resume:
            saved_model, saved = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
            model = _model(seed=99)
            model.load_state_dict(saved_model)
            opt = mk.Muon(model.parameters(), lr=0.02)
            opt.load_state_dict(saved)
            assert opt.state[model[0].weight]["momentum_buffer"].dtype == torch.float32  # as saved
            for key, value in saved["state"][0].items():
                assert torch.equal(opt.state_dict()["state"][0][key], value), key
        opt.param_groups[0]["momentum_dtype"] = None
        _train(model, opt, 2, seed=2)
        return model, opt

    straight, resumed = run(resume=False), run(resume=True)
    _assert_same(*straight, *resumed)


@pytest.mark.parametrize("group, key, value, match", [
    (1, "betas", (0.9, 1.5), r"betas must be two numbers in \[0, 1\)"),
    (0, "momentum_rounding", "sometimes", "momentum_rounding must be one of"),
    (0, "nesterov", 1, "nesterov must be True or False"),
    (1, "amsgrad", "no", "amsgrad must be True or False"),
    (0, "use_muon", False, "it was saved with use_muon=False, this optimizer's group has use_muon=True"),
    (0, "use_muon", 1, "use_muon must be True or False, got 1"),
    (0, "ns_coefficients", "nonsense", "unknown preset 'nonsense'"),
    (0, "momentum_dtype", "float33", "momentum_dtype='float33' is not a torch dtype"),
])
def test_a_checkpoint_with_a_setting_a_step_would_refuse_is_refused_at_load(group, key, value, match):
    """Loaded settings went unchecked: the load replaced every group (converting an int8 momentum
    on the way) and only the next step refused, saying "nothing was modified"."""
    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02, momentum_dtype="int8")
    _train(model, opt, 2, seed=1)
    saved = opt.state_dict()
    saved["param_groups"][group][key] = value
    before = opt.state_dict()
    with pytest.raises(ValueError, match=rf"state_dict param group {group}: .*{match}.*nothing was loaded"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        assert all(torch.equal(v, after["state"][index][k]) for k, v in state.items())


def test_a_checkpoint_keeps_the_loading_optimizers_backend():
    """A checkpoint saved on a GPU with backend="triton" loads into an optimizer built with
    backend="torch" on a CPU (it was refused: "backend='triton' cannot run on cpu") and resumes as
    the torch backend would."""
    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02, backend="torch")
    _train(model, opt, 2, seed=1)
    saved = _roundtrip(opt.state_dict())
    twin_model = _model(seed=99)
    twin_model.load_state_dict(model.state_dict())
    twin = mk.Muon(twin_model.parameters(), lr=0.02, backend="torch")
    saved["param_groups"][0]["backend"] = "triton"
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["backend"] == "torch"
    _train(model, opt, 2, seed=2)
    _train(twin_model, twin, 2, seed=2)
    _assert_same(model, opt, twin_model, twin)


def _named_optimizer(names):
    g = torch.Generator().manual_seed(0)
    params = {name: torch.nn.Parameter(torch.randn(12, 8, generator=g)) for name in names}
    opt = mk.Muon(list(params.items()), lr=0.02)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return opt, params


def test_a_group_of_another_size_is_refused_and_nothing_loads():
    saved, _ = _named_optimizer(["a", "b", "c"])
    opt, params = _named_optimizer(["a", "b", "c", "d"])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"param group 0 has 3 parameters, this optimizer's has 4: .*nothing was loaded"):
        opt.load_state_dict(saved.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(v, after["state"][i][k]) for i, s in before["state"].items() for k, v in s.items())


def test_parameters_listed_in_another_order_warn_and_keep_the_live_names():
    """State loads by position (as torch's does): a checkpoint whose same-shape parameters were
    listed in another order would hand each one another's momentum. Wrapper prefixes (DDP's
    ``module.``, torch.compile's ``_orig_mod.``) are the same parameter: no warning."""
    saved, _ = _named_optimizer(["a", "b"])
    state = saved.state_dict()
    opt, _ = _named_optimizer(["b", "a"])
    with pytest.warns(UserWarning, match=r"param group 0: 2 parameter name\(s\) differ .*'b' here, 'a' saved"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["param_names"] == ["b", "a"]
    wrapped, _ = _named_optimizer(["module._orig_mod.a", "module._orig_mod.b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped.load_state_dict(state)
    assert wrapped.param_groups[0]["param_names"] == ["module._orig_mod.a", "module._orig_mod.b"]


def test_a_checkpoint_matched_by_name_does_not_warn():
    """torch.distributed.checkpoint hands load_state_dict groups whose params are the names in the
    live order, with the state keyed by name (and param_names copied from the saved group, in the
    saved order): matched by name, no warning, and the live names stay."""
    saved, _ = _named_optimizer(["a", "b"])
    state = saved.state_dict()
    opt, params = _named_optimizer(["b", "a"])
    by_name = {"state": {"b": state["state"][1], "a": state["state"][0]},
               "param_groups": [{**state["param_groups"][0], "params": ["b", "a"], "param_names": ["a", "b"]}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(by_name)
    assert opt.param_groups[0]["param_names"] == ["b", "a"]
    assert torch.equal(opt.state[params["a"]]["momentum_buffer"], state["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("options", [{}, {"momentum_dtype": "int8"},
                                     {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"}])
def test_loading_into_an_optimizer_that_has_stepped_resumes_like_a_fresh_one(options):
    """An optimizer whose plan is built (its buckets hold its state tensors) loads another run's
    checkpoint: the next steps use the loaded tensors — momentum, int8 scales, rounding counters —
    exactly as a fresh optimizer loading the same checkpoint does, not the buffers the old plan held."""
    kwargs = dict(lr=0.02, adamw_weight_decay=0.01, **options)
    other = _model(seed=5)
    other_opt = mk.Muon(other.parameters(), **kwargs)
    _train(other, other_opt, 3, seed=5)
    saved_model, saved_opt = _roundtrip(other.state_dict()), other_opt.state_dict()

    stepped = _model()
    opt = mk.Muon(stepped.parameters(), **kwargs)
    _train(stepped, opt, 2, seed=1)
    stepped.load_state_dict(saved_model)
    opt.load_state_dict(_roundtrip(saved_opt))  # each its own tensors: a load keeps the dict's

    fresh = _model(seed=99)
    fresh.load_state_dict(saved_model)
    fresh_opt = mk.Muon(fresh.parameters(), **kwargs)
    fresh_opt.load_state_dict(_roundtrip(saved_opt))
    _train(stepped, opt, 2, seed=2)
    _train(fresh, fresh_opt, 2, seed=2)
    _assert_same(stepped, opt, fresh, fresh_opt)


def test_a_checkpoint_saved_with_another_matrix_view_loads_and_steps_alike():
    """Saved state shapes are judged by the saved settings (transposed view + NorMuon: v per column),
    which the load restores; both optimizers then step alike."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 8))
    p.grad = torch.randn(4, 8)
    saved = mk.Muon([p], adaptive="normuon", matrix_view="transposed", backend="torch")
    saved.step()
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    loaded = mk.Muon([q], adaptive="normuon", backend="torch")
    loaded.load_state_dict(saved.state_dict())
    assert loaded.param_groups[0]["matrix_view"] == "transposed"
    saved.step()
    loaded.step()
    assert torch.equal(p, q)


def test_a_torch_optim_muon_checkpoint_is_refused_by_an_adamw_group():
    w = torch.nn.Parameter(torch.randn(4, 8))
    w.grad = torch.randn(4, 8)
    theirs = torch.optim.Muon([w])
    theirs.step()
    ours = mk.Muon([{"params": [w], "use_muon": False}], backend="torch")
    with pytest.raises(ValueError, match="momentum group"):
        ours.load_state_dict(theirs.state_dict())
    assert not ours.state


def test_a_variant_turned_off_leaves_no_state_that_blocks_a_view_change():
    p = torch.nn.Parameter(torch.randn(4, 8))
    p.grad = torch.randn(4, 8)
    opt = mk.Muon([p], adaptive="normuon", backend="torch")
    opt.step()
    opt.param_groups[0].update(adaptive="none", matrix_view="transposed")
    opt.step()  # the stale normuon_v (per row) is not checked against the new view
