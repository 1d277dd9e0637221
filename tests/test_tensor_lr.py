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
