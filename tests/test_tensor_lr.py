"""lr as a tensor (a scheduler's, or a CUDA graph's: written in place, never read back to the host)
gives the float-lr results, and the capturable flag is validated."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from oracles import rel_err


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.2) for s in [(12, 20), (20, 12), (12, 20), (7,)]]


def _run(lr_kind: str, **kw):
    ps = _params()
    lr = torch.tensor(0.05) if lr_kind == "tensor" else 0.05
    opt = mk.Muon(ps, lr=lr, weight_decay=0.1, ns_dtype=torch.float32, backend="torch", **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        new_lr = 0.05 / (step + 2)
        opt.step()
        if lr_kind == "tensor":
            opt.param_groups[0]["lr"].fill_(new_lr)  # in place: a captured graph would see it
        else:
            opt.param_groups[0]["lr"] = new_lr
    return ps


@pytest.mark.parametrize("capturable", [False, True])
def test_tensor_lr_matches_float_lr(capturable):
    for a, b in zip(_run("float"), _run("tensor", capturable=capturable)):
        # fp32: the tensor path multiplies O by -lr·scale and then adds (two roundings) where the
        # float path adds with alpha (one), so agreement is to fp32 rounding, not bit for bit.
        assert rel_err(b, a) <= 1e-6


def test_capturable_must_be_a_bool():
    with pytest.raises(ValueError, match="capturable"):
        mk.Muon(_params(), capturable="yes")


def test_capturable_settings_survive_state_dict():
    opt = mk.Muon(_params(), capturable=True)
    assert all(g["capturable"] for g in opt.param_groups)
    fresh = mk.Muon(_params())
    fresh.load_state_dict(opt.state_dict())
    assert all(g["capturable"] for g in fresh.param_groups)


@pytest.mark.parametrize("use_muon", [True, False])
def test_capturable_refuses_an_lr_on_another_device_than_its_parameters(use_muon):
    """A capture would copy a host lr: refused at the step, naming the group, the parameter and the
    fix. Meta-device parameters stand in for a GPU's here (the check runs before any arithmetic);
    tests/gpu/test_gpu_hardening.py checks on a GPU that nothing is modified."""
    p = torch.nn.Parameter(torch.empty(48, 32, device="meta"))
    p.grad = torch.empty(48, 32, device="meta")
    group = {"params": [p], "use_muon": use_muon, **({} if use_muon else {"lr": torch.tensor(0.02)})}
    opt = mk.Muon([group], lr=torch.tensor(0.02), capturable=True)
    with pytest.raises(ValueError, match=r"^param group 0 has capturable=True and lr on cpu, but parameter #0 of "
                                         r"shape \(48, 32\) is on meta: put lr on the parameters' device"):
        opt.step()
    assert not opt.state
