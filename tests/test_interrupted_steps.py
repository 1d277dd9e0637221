"""A step interrupted by an allocation that fails (an OOM the training loop catches, then retries
with a smaller batch) never leaves optimizer state half made or a weight decayed without its update:
each state change is made whole or not at all. (Like torch.optim's, a step is not transactional
across parameters: README, "A step that raises".)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels import momentum_precision


class _OOM:
    """Calls ``real`` but raises torch.OutOfMemoryError the ``fail_at``-th time (1-based) ``match`` accepts."""

    def __init__(self, real, fail_at: int = 1, match=lambda *a, **k: True):
        self.real, self.fail_at, self.match, self.seen = real, fail_at, match, 0

    def __call__(self, *args, **kwargs):
        if self.match(*args, **kwargs):
            self.seen += 1
            if self.seen == self.fail_at:
                raise torch.OutOfMemoryError("simulated: out of memory")
        return self.real(*args, **kwargs)


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for i, p in enumerate(params)})


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys()
            and all(sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]) for i in sa))


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_int8_momentum_made_at_the_first_step_is_whole_or_absent(monkeypatch):
    p = nn.Parameter(torch.randn(24, 16))
    opt = mk.Muon([p], momentum_dtype="int8", backend="torch")
    _grads([p], 0)
    monkeypatch.setattr(momentum_precision, "new_scales", _OOM(momentum_precision.new_scales))
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert "momentum_buffer" not in opt.state[p]  # no buffer without its scales
    opt.step()  # the retry makes both
    assert opt.state[p]["momentum_buffer"].dtype == torch.int8 and "momentum_scale" in opt.state[p]


def test_a_failed_conversion_away_from_int8_keeps_the_int8_momentum_and_its_scales(monkeypatch):
    p = nn.Parameter(torch.randn(24, 16))
    opt = mk.Muon([p], momentum_dtype="int8", backend="torch")
    _grads([p], 0)
    opt.step()
    before = _snapshot(opt, [p])
    opt.param_groups[0]["momentum_dtype"] = torch.float32
    monkeypatch.setattr(momentum_precision, "dequantize", _OOM(momentum_precision.dequantize))
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert _same(_snapshot(opt, [p]), before)
    opt.step()  # the retry converts, and steps
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32 and "momentum_scale" not in opt.state[p]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_state_made_at_the_first_step_is_whole_or_absent(monkeypatch, amsgrad):
    bias = nn.Parameter(torch.randn(16))
    opt = mk.Muon([{"params": [bias], "use_muon": False, "amsgrad": amsgrad}])
    _grads([bias], 0)
    # the last zeros_like of the bias (exp_avg_sq, or amsgrad's max_exp_avg_sq) fails
    monkeypatch.setattr(torch, "zeros_like", _OOM(torch.zeros_like, 2 + amsgrad, lambda t, *a, **k: t is bias))
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert not opt.state[bias]
    opt.step()
    assert {"step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] * amsgrad)} == opt.state[bias].keys()


def test_the_torch_backend_decays_no_weight_whose_update_it_could_not_make(monkeypatch):
    """torch.optim.Muon makes the update before it decays the weight; so does the torch backend
    with a tensor lr, whose scaled update is a new tensor (a float one is an alpha of the add)."""
    ps = [nn.Parameter(torch.randn(24, 16)), nn.Parameter(torch.randn(24, 16))]
    opt = mk.Muon(ps, lr=torch.tensor(0.02), weight_decay=0.1, backend="torch")
    _grads(ps, 0)
    opt.step()
    _grads(ps, 1)
    weights = [p.detach().clone() for p in ps]
    monkeypatch.setattr(torch, "_foreach_mul", _OOM(torch._foreach_mul))  # the scaled update's allocation
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(ps, weights))


@pytest.mark.parametrize("lr", [0.02, torch.tensor(0.02)], ids=["float-lr", "tensor-lr"])
def test_cautious_decay_on_the_torch_backend_leaves_each_weight_whole_or_untouched(monkeypatch, lr):
    """Cautious decay makes one factor tensor per parameter: when the second one cannot be
    allocated, the first weight has had its whole step (decay and update, as an uninterrupted step
    gives it) and the second none of it. (On a CPU a tall matrix is updated on its own; two wide
    ones of a group share one call.)"""
    def run(fail):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(16, 24))]  # wide: one batch
        opt = mk.Muon(ps, lr=lr.clone() if torch.is_tensor(lr) else lr, weight_decay=0.5,
                      weight_decay_mode="cautious", backend="torch")
        _grads(ps, 0)
        opt.step()
        _grads(ps, 1)
        before = [p.detach().clone() for p in ps]
        if fail:
            with monkeypatch.context() as m:
                m.setattr(torch, "where", _OOM(torch.where, 2))
                with pytest.raises(torch.OutOfMemoryError):
                    opt.step()
        else:
            opt.step()
        return before, [p.detach().clone() for p in ps]

    before, stepped = run(fail=False)
    _, interrupted = run(fail=True)
    assert not torch.equal(stepped[0], before[0]) and not torch.equal(stepped[1], before[1])
    assert torch.equal(interrupted[0], stepped[0])  # decay and update, bit for bit
    assert torch.equal(interrupted[1], before[1])  # nothing


def test_cautious_decay_widens_a_narrower_update_before_the_decay(monkeypatch):
    """fp32 weights with a bf16 Newton–Schulz (a CPU's default): the update reaches the add already
    in fp32 (widened, exactly, before the decay), so the add allocates no conversion after it."""
    ps = [nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(16, 24))]
    opt = mk.Muon(ps, lr=0.02, weight_decay=0.5, weight_decay_mode="cautious", backend="torch")
    _grads(ps, 0)
    seen = []
    real = torch._foreach_add_

    def add(params, others, **kwargs):
        seen.extend((p.dtype, o.dtype) for p, o in zip(params, others) if torch.is_tensor(o))
        return real(params, others, **kwargs)

    monkeypatch.setattr(torch, "_foreach_add_", add)
    opt.step()
    assert seen == [(torch.float32, torch.float32)] * 2
