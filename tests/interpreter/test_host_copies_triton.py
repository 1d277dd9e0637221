"""Steady-state Triton steps copy nothing from the host, on both Newton–Schulz paths and with a
tensor lr; address tables used during a (simulated) CUDA-graph capture outlive LRU eviction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon_kernels as mk
from host_copies import no_host_to_device_copies
from muon_kernels.triton_kernels import fused_update


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("shape, path", [((24, 40), "small"), ((40, 130), "symmetric")])
def test_triton_steady_state_step_makes_no_host_copy(shape, path, tensor_lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0]), nn.Linear(shape[0], shape[1]))
    lr = torch.tensor(0.02) if tensor_lr else 0.02
    opt = mk.Muon(mk.param_groups(model), lr=lr, backend="triton", ns_dtype=torch.float32, ns_steps=2)
    assert {row.path for row in opt.plan() if row.method == "Muon"} == {path}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    with no_host_to_device_copies():
        opt.step()


@pytest.mark.parametrize("options", [
    {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0},
    {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic", "adaptive": "normuon"},
    {"momentum_dtype": "int8", "momentum_rounding": "stochastic"},
])
def test_triton_steady_state_step_with_variants_makes_no_host_copy(options):
    """The statistics launch, the per-matrix factors, the step counters and the split/seed tables
    all stay on the device after the first step."""
    torch.manual_seed(0)
    fused = nn.Linear(16, 48)
    splittable = options.get("momentum_dtype") != "int8" and "constraint" not in options
    groups = [{"params": [fused.weight], **({"split_sizes": (16, 16, 16)} if splittable else {})}]
    opt = mk.Muon(groups, lr=torch.tensor(0.02), backend="triton", ns_dtype=torch.float32, ns_steps=2, **options)
    fused.weight.grad = torch.randn_like(fused.weight)
    opt.step()
    with no_host_to_device_copies():
        opt.step()


def test_tables_used_in_a_capture_survive_eviction(monkeypatch):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(24, 40))
    opt = mk.Muon([p], backend="triton", ns_dtype=torch.float32, ns_steps=1)
    p.grad = torch.randn_like(p)
    opt.step()  # eager: the tables are built
    monkeypatch.setattr(fused_update, "_capturing", lambda device: True)
    opt.step()  # "captured": the graph now points at these tables
    key = (p.device, (p.grad.data_ptr(),))
    captured = fused_update._PINNED_TABLES[key]
    fused_update._ADDRESS_TABLES.clear()  # other buckets' tables pushed every one out of the LRU
    opt.step()  # a replay-time lookup (still "capturing"): no rebuild, the same table
    assert fused_update._PINNED_TABLES[key] is captured
