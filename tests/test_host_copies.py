"""A steady-state step copies nothing from the host (torch backend; the Triton paths are trapped
the same way in tests/interpreter/test_host_copies_triton.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon_kernels as mk
from host_copies import HostCopy, no_host_to_device_copies


def test_the_trap_catches_a_host_copy():
    with no_host_to_device_copies(), pytest.raises(HostCopy):
        torch.tensor([1.0, 2.0])


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("form, nesterov", [("ema", True), ("sgd", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_steady_state_step_makes_no_host_copy(tensor_lr, form, nesterov, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)).to(dtype)
    lr = torch.tensor(0.02, dtype=dtype) if tensor_lr else 0.02
    adamw_lr = torch.tensor(3e-4, dtype=dtype) if tensor_lr else 3e-4
    opt = mk.Muon(mk.param_groups(model), lr=lr, adamw_lr=adamw_lr, momentum_form=form, nesterov=nesterov,
                  backend="torch", ns_dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # the warm-up step builds the plan and its tables
    with no_host_to_device_copies():
        for _ in range(2):
            opt.step()


@pytest.mark.parametrize("options", [
    {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0},
    {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic", "split_sizes": (4, 4)},
    {"momentum_dtype": "int8", "momentum_rounding": "stochastic"},
])
def test_torch_backend_variants_make_no_host_copy(options):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(8, 6))
    opt = mk.Muon([W], lr=torch.tensor(0.02), backend="torch", ns_dtype=torch.float32, **options)
    W.grad = torch.randn_like(W)
    opt.step()
    with no_host_to_device_copies():
        for _ in range(2):
            opt.step()


def test_address_tables_are_a_bounded_lru(monkeypatch):
    """A step reuses its tables (no copy to the device); past the bound the least recently used
    table goes, never one a lookup just used, and never the newest."""
    from collections import OrderedDict

    from muon_kernels.triton_kernels import fused_update

    cpu = torch.device("cpu")
    monkeypatch.setattr(fused_update, "_ADDRESS_TABLES", OrderedDict())
    monkeypatch.setattr(fused_update, "_ADDRESS_TABLES_MAX", 3)
    first = fused_update.int_table((1,), cpu)
    for values in ((2,), (3,)):
        fused_update.int_table(values, cpu)
    assert fused_update.int_table((1,), cpu) is first  # a hit: the same device copy, now the most recent
    fused_update.int_table((4,), cpu)
    assert list(fused_update._ADDRESS_TABLES) == [(cpu, (3,)), (cpu, (1,)), (cpu, (4,))]
    assert fused_update.int_table((1,), cpu) is first
