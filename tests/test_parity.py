"""Muon.step() against torch.optim.Muon and against an fp64 recurrence."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

import muon_kernels as mk
from oracles import reference_ns, rel_err

SHAPES = [(16, 24), (24, 16), (32, 32), (16, 24), (8, 40)]
STEPS = 12
# bf16 rounding differs with where normalization happens (torch normalizes in bf16, we in fp32):
# the parity bound on parameter displacement.
DISPLACEMENT_TOL = 3e-2


def _grads(dtype, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]


def _params(dtype, seed=1):
    # Weights at a realistic scale (~1/sqrt(fan_in)), so a bf16 parameter's ulp is well below one
    # step's update and the comparison measures the optimizer, not bf16 rounding of the weights.
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) / s[1] ** 0.5).to(dtype)) for s in SHAPES]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _displacement_err(ours, theirs, start):
    return max(((a.double() - b.double()).norm() / (b.double() - s.double()).norm()).item() for a, b, s in zip(ours, theirs, start))


OPTIONS = list(
    itertools.product(
        [True, False],  # nesterov
        [None, "original", "match_rms_adamw"],  # adjust_lr_fn
        [0.0, 0.1],  # weight_decay
        [0.0, 0.9, 0.95],  # momentum
        [3, 5],  # ns_steps
        [(3.4445, -4.7750, 2.0315), (3.0, -3.2, 1.2)],  # ns_coefficients
    )
)


@pytest.mark.parametrize("nesterov, adjust_lr_fn, weight_decay, momentum, ns_steps, coefficients", OPTIONS)
def test_matches_torch_optim_muon(nesterov, adjust_lr_fn, weight_decay, momentum, ns_steps, coefficients):
    kwargs = dict(
        lr=0.02,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_coefficients=coefficients,
        ns_steps=ns_steps,
        adjust_lr_fn=adjust_lr_fn,
    )
    ours, theirs = _params(torch.float32), _params(torch.float32)
    start = [p.detach().clone() for p in ours]
    grads = _grads(torch.float32)
    _run(mk.Muon(ours, **kwargs), ours, grads)
    _run(torch.optim.Muon(theirs, **kwargs), theirs, grads)
    assert _displacement_err(ours, theirs, start) <= DISPLACEMENT_TOL


def test_a_closure_reevaluates_the_loss_with_gradients_enabled_like_torch():
    """``step(closure)`` as torch's optimizers run it: the closure is called with gradients enabled
    (step itself runs under no_grad), its loss is returned, and the step uses the gradients it made."""
    def train(make_opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 20, bias=False), torch.nn.Tanh(),
                                    torch.nn.Linear(20, 6, bias=False))
        opt = make_opt(model.parameters())
        x, y = torch.randn(32, 12), torch.randn(32, 6)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses = [opt.step(closure).item() for _ in range(5)]
        return losses, [p.detach() for p in model.parameters()]

    kwargs = dict(lr=0.02, weight_decay=0.1)
    (ours, ours_params), (theirs, theirs_params) = (train(lambda ps: mk.Muon(ps, **kwargs)),
                                                    train(lambda ps: torch.optim.Muon(ps, **kwargs)))
    assert ours[0] == theirs[0] and ours[-1] < ours[0]
    assert all(abs(a - b) <= 1e-2 * abs(b) for a, b in zip(ours, theirs))
    for a, b in zip(ours_params, theirs_params):
        assert rel_err(a, b) <= 1e-2


def _torch_reference_step(params, bufs, grads, *, lr, weight_decay, momentum, nesterov):
    """torch.optim.Muon's own step pieces, fed a copy of the buffer (torch 2.13 normalizes a bf16
    buffer in place when nesterov=False, corrupting it)."""
    for p, buf, g in zip(params, bufs, grads):
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf.clone()
        update = _zeropower_via_newtonschulz(update, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        p.mul_(1 - lr * weight_decay)
        p.add_(update, alpha=-_adjust_lr(lr, None, p.shape))


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("momentum_dtype", [None, torch.float32])
def test_bf16_params_match_torch_reference(nesterov, momentum_dtype):
    ours, theirs = _params(torch.bfloat16), [p.detach().clone() for p in _params(torch.bfloat16)]
    start = [p.detach().clone() for p in ours]
    bufs = [torch.zeros_like(p, dtype=momentum_dtype or p.dtype) for p in theirs]
    grads = _grads(torch.bfloat16)
    opt = mk.Muon(ours, lr=0.05, nesterov=nesterov, momentum_dtype=momentum_dtype)
    _run(opt, ours, grads)
    with torch.no_grad():
        for step_grads in grads:
            _torch_reference_step(
                theirs, bufs, [g.to(b.dtype) for g, b in zip(step_grads, bufs)],
                lr=0.05, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
            )
    assert _displacement_err(ours, theirs, start) <= DISPLACEMENT_TOL
    for p, b in zip(ours, bufs):
        assert opt.state[p]["momentum_buffer"].dtype == (momentum_dtype or torch.bfloat16)
        # The momentum buffer is a plain EMA of the gradients: never normalized in place.
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["ema", "sgd"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw", "spectral"])
def test_fp32_iteration_matches_fp64_recurrence(form, nesterov, adjust_lr_fn):
    """Three steps with ns_dtype=fp32: each update within 1e-4 of momentum + NS + scale computed in fp64."""
    params = _params(torch.float32)
    lr, wd, mu = 0.05, 0.1, 0.9
    opt = mk.Muon(params, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn,
                  ns_dtype=torch.float32, momentum_form=form)
    bufs = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for step_grads in _grads(torch.float32, steps=3):
        before = [p.detach().double().clone() for p in params]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for p, w, buf, g in zip(params, before, bufs, step_grads):
            g = g.double()
            if form == "ema":
                buf.mul_(mu).add_((1 - mu) * g)
                u = (1 - mu) * g + mu * buf if nesterov else buf
            else:
                buf.mul_(mu).add_(g)
                u = g + mu * buf if nesterov else buf
            rows, cols = p.shape
            scale = {None: math.sqrt(max(1, rows / cols)), "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols)),
                     "spectral": math.sqrt(rows / cols)}[adjust_lr_fn]
            expected = -lr * scale * reference_ns(u)
            assert rel_err(p.detach().double() - w * (1 - lr * wd), expected) <= 1e-4


def test_match_on_a_real_model_loss():
    """An MLP trained on its own loss with param_groups(): matches torch.optim.Muon + torch.optim.AdamW.

    The logits head goes to AdamW (as in practice): a cross-entropy head gradient has an exactly
    null direction (rows sum to zero), which bf16 noise fills differently in every implementation.
    """
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(  # noqa: E731
        torch.nn.Linear(20, 48), torch.nn.GELU(), torch.nn.Linear(48, 48), torch.nn.GELU(), torch.nn.Linear(48, 10)
    )
    ours, theirs = make(), make()
    theirs.load_state_dict(ours.state_dict())
    start = [p.detach().clone() for p in ours.parameters()]
    opt = mk.Muon(mk.param_groups(ours, head=ours[4]), lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.01)
    hidden = [theirs[0].weight, theirs[2].weight]
    t_muon = torch.optim.Muon(hidden, lr=0.02)
    t_adam = torch.optim.AdamW([p for p in theirs.parameters() if all(p is not h for h in hidden)], lr=1e-3,
                               betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    for _ in range(10):
        for model in (ours, theirs):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        t_muon.step()
        t_adam.step()
    assert _displacement_err(list(ours.parameters()), list(theirs.parameters()), start) <= DISPLACEMENT_TOL


@pytest.mark.parametrize("flags", [{"amsgrad": True}, {"maximize": True}, {"amsgrad": True, "maximize": True}])
def test_adamw_groups_honour_amsgrad_and_maximize_as_torch(flags):
    """A use_muon=False group's amsgrad and maximize mean what they mean to torch.optim.AdamW (they
    were once dropped silently): the same bits as torch's (fused) AdamW with the same flags, the
    same state keys, and a checkpoint that resumes identically."""
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(s, generator=g) for s in ((7,), (5, 3))]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    settings = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    opt = mk.Muon([{"params": ours, "use_muon": False, **settings, **flags}])
    ref = torch.optim.AdamW(theirs, **settings, **flags, fused=True)  # ours takes torch's fused kernel on a CPU too
    for step in range(6):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g) * (3.0 if step == 1 else 0.5)  # a large step: amsgrad's max holds
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        if step == 2:  # resume through a checkpoint half way
            saved = opt.state_dict()
            opt = mk.Muon([{"params": ours, "use_muon": False, **settings, **flags}])
            opt.load_state_dict(saved)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert set(opt.state[a]) == set(ref.state[b])


def test_amsgrad_turned_on_later_starts_its_maximum_from_zeros():
    """torch.optim.AdamW raises KeyError when amsgrad is switched on after a step; ours makes the
    maximum then, from zeros: the same bits as a torch AdamW whose max_exp_avg_sq was made as zeros."""
    g = torch.Generator().manual_seed(4)
    start = torch.randn(5, 3, generator=g)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    opt = mk.Muon([{"params": [ours], "use_muon": False, **settings}])
    ref = torch.optim.AdamW([theirs], **settings, fused=True)
    for step in range(4):
        if step == 2:
            opt.param_groups[0]["amsgrad"] = ref.param_groups[0]["amsgrad"] = True
            ref.state[theirs]["max_exp_avg_sq"] = torch.zeros_like(theirs)
        ours.grad = torch.randn(5, 3, generator=g)
        theirs.grad = ours.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours, theirs) and set(opt.state[ours]) == set(ref.state[theirs])
    assert torch.equal(opt.state[ours]["max_exp_avg_sq"], ref.state[theirs]["max_exp_avg_sq"])


def test_complex_adamw_parameters_step_like_torch():
    """A complex parameter in an AdamW group (a use_muon=False group may hold one: Muon may not) steps
    as torch.optim.AdamW steps it, its real and imaginary parts as two real values."""
    g = torch.Generator().manual_seed(5)
    start = torch.randn(6, dtype=torch.complex64, generator=g)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = mk.Muon([{"params": [ours], "use_muon": False, "lr": 0.01, "weight_decay": 0.1}])
    ref = torch.optim.AdamW([theirs], lr=0.01, betas=opt.param_groups[0]["betas"], eps=opt.param_groups[0]["eps"],
                            weight_decay=0.1)
    for _ in range(3):
        ours.grad = torch.randn(6, dtype=torch.complex64, generator=g)
        theirs.grad = ours.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key, value, message", [
    ("amsgrad", 1, "amsgrad must be True or False"),
    ("maximize", "yes", "maximize must be True or False"),
    ("differentiable", True, "differentiable=True is not supported"),
])
def test_adamw_group_flags_are_checked(key, value, message):
    """Checked at construction and, written into param_groups later, at the next step (which then
    modifies nothing)."""
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=message):
        mk.Muon([{"params": [p], "use_muon": False, key: value}])
    opt = mk.Muon([{"params": [p], "use_muon": False}])
    opt.param_groups[0][key] = value
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=f"param group 0: {message}.*nothing was modified"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state


@pytest.mark.parametrize("group", [{"use_muon": True}, {}], ids=["Muon group", "group split into Muon and AdamW"])
def test_a_muon_group_refuses_maximize(group):
    """AdamW groups maximize; Muon cannot (nor can torch.optim.Muon): a Muon group, or a group that is
    split into a Muon and an AdamW half (whose biases alone would otherwise climb), is refused."""
    W, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    params = [W] if group else [W, b]
    with pytest.raises(ValueError, match="maximize=True: Muon has no maximize"):
        mk.Muon([{"params": params, "maximize": True, **group}])
    opt = mk.Muon([{"params": params, **group}])
    opt.param_groups[0]["maximize"] = True
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="param group 0: maximize=True: Muon has no maximize.*nothing was modified"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before)) and not opt.state


@pytest.mark.parametrize("layout", ["expanded gradient", "strided parameter", "transposed parameter"])
def test_adamw_groups_match_torch_on_non_contiguous_layouts(layout):
    """torch's fused AdamW kernel addresses every tensor as flat memory: over an expanded gradient or
    a strided parameter it read past the gradient and wrote outside the parameter (the memory
    between a strided parameter's elements changed). Such groups take torch's foreach path: the
    numbers of torch.optim.AdamW (whose default is foreach), and nothing outside the parameter moves."""
    g = torch.Generator().manual_seed(5)
    store = torch.zeros(12, 6)
    if layout == "strided parameter":
        ours = torch.nn.Parameter(store[::2])
    elif layout == "transposed parameter":
        ours = torch.nn.Parameter(torch.randn(6, 4, generator=g).t())
    else:
        ours = torch.nn.Parameter(torch.randn(4, 6, generator=g))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = mk.Muon([{"params": [ours], "use_muon": False, "lr": 1e-2}])
    ref = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)
    for _ in range(3):
        grad = torch.randn(1, 6, generator=g).expand(4, 6) if layout == "expanded gradient" \
            else torch.randn(ours.shape, generator=g)
        ours.grad, theirs.grad = grad, grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    if layout == "strided parameter":
        assert not store[1::2].any()  # the rows between the parameter's own are untouched


def test_defaults_are_torch_optim_muons():
    """The constructor's defaults are torch.optim.Muon's (the parity tests pass every value
    explicitly, so a drifted default would pass them): ns_steps=None runs the preset's own count,
    torch's 5 for its Keller coefficients."""
    import inspect

    ours, theirs = inspect.signature(mk.Muon).parameters, inspect.signature(torch.optim.Muon).parameters
    for name in ("lr", "weight_decay", "momentum", "nesterov", "eps", "adjust_lr_fn"):
        assert ours[name].default == theirs[name].default, name
    assert theirs["ns_coefficients"].default == (3.4445, -4.7750, 2.0315) == mk.PRESETS["keller"][0]
    assert theirs["ns_steps"].default == 5 and ours["ns_steps"].default is None
    p = torch.nn.Parameter(torch.zeros(4, 8))
    group = mk.Muon([p]).param_groups[0]
    config = mk.ns_config.resolve_ns_config(group["ns_coefficients"], group["ns_steps"], group["eps"])
    assert config.coefficients == ((3.4445, -4.7750, 2.0315),) * 5


@pytest.mark.parametrize("form", ["ema", "sgd"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("into_outs", [False, True])
def test_torch_backend_momentum_is_its_formula_over_steps(form, nesterov, into_outs):
    """Both paths of ``momentum_update`` — new tensors (what a GPU's torch backend takes) and ``outs``
    (the CPU stack) — against the docstring's formulas in fp64, over 3 steps (after one step U ∝ G
    for either Nesterov weight, so a swapped weight needs a second)."""
    from muon_kernels.backends.torch_backend import momentum_update

    mu = 0.9
    g = torch.Generator().manual_seed(7)
    grads = [[torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)]
             for _ in range(3)]
    bufs = [torch.zeros(5, 6, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)]
    ref = [b.clone() for b in bufs]
    for step in grads:
        outs = [torch.empty_like(b) for b in bufs] if into_outs else None
        us = momentum_update(bufs, step, momentum=mu, nesterov=nesterov, form=form, outs=outs)
        us = outs if into_outs else us
        for i, G in enumerate(step):
            ref[i] = mu * ref[i] + ((1 - mu) * G if form == "ema" else G)
            want = (((1 - mu) * G if form == "ema" else G) + mu * ref[i]) if nesterov else ref[i]
            torch.testing.assert_close(bufs[i], ref[i], rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(us[i], want, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_decay_and_sgd_momentum_are_torchs_bit_for_bit(dtype):
    """A zero gradient orthogonalizes to zero, so only the decay moves W: it must be torch.optim.Muon's
    ``p.mul_(1 - lr·wd)`` bit for bit (a scalar rounded to 16 bits first would double it); the SGD form's
    ``buf·μ`` likewise ``buf.mul_(μ)``."""
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(32, 32, generator=g).to(dtype))
    want = W.detach().clone().mul_(1 - 0.02 * 0.1)
    W.grad = torch.zeros_like(W)
    mk.Muon([W], lr=0.02, weight_decay=0.1).step()
    assert torch.equal(W.detach(), want)
    V = torch.nn.Parameter(torch.randn(32, 32, generator=g).to(dtype))
    opt = mk.Muon([V], lr=0.02, weight_decay=0.0, momentum_form="sgd", momentum_dtype=dtype)
    V.grad = torch.randn(32, 32, generator=g).to(dtype)
    opt.step()
    buf = opt.state[V]["momentum_buffer"].clone()
    V.grad = torch.zeros_like(V)
    opt.step()
    assert torch.equal(opt.state[V]["momentum_buffer"], buf.mul_(0.95))
