"""Dispatch structure: one backend call per bucket, chunking, plan cache, plan(), backends, compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels.backends import torch_backend


@pytest.fixture
def calls(monkeypatch):
    seen = []
    original = torch_backend.orthogonalize

    def counting(stack, config, ns_dtype):
        seen.append(tuple(stack.shape))
        return original(stack, config, ns_dtype)

    monkeypatch.setattr(torch_backend, "orthogonalize", counting)
    return seen


def _gpt_block(d=32, layers=3):
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    return nn.Sequential(*blocks)


def _fill_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_one_backend_call_per_bucket(calls):
    model = _gpt_block()
    opt = mk.Muon(model.parameters())
    _fill_grads(model)
    opt.step()
    # Oriented shapes: (32, 96) ×3, (32, 32) ×3, (32, 128) ×6 (up and down projections share it).
    assert sorted(calls) == [(3, 32, 32), (3, 32, 96), (6, 32, 128)]
    calls.clear()
    _fill_grads(model, seed=1)
    opt.step()
    assert len(calls) == 3


def test_workspace_cap_chunks_buckets_with_identical_results(calls):
    model = _gpt_block()
    reference = _gpt_block()
    reference.load_state_dict(model.state_dict())
    per_matrix = 4 * 32 * 128 + 2 * (2 * 32 * 128 + 2 * 32 * 32)
    capped = mk.Muon(model.parameters(), max_workspace_bytes=2 * per_matrix)
    free = mk.Muon(reference.parameters(), max_workspace_bytes=None)
    for seed in range(3):
        _fill_grads(model, seed)
        _fill_grads(reference, seed)
        calls.clear()
        capped.step()
        assert sorted(calls).count((2, 32, 128)) == 3
        free.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_plan_cache_follows_changing_gradients(calls):
    model = _gpt_block(layers=2)
    opt = mk.Muon(model.parameters())
    _fill_grads(model)
    opt.step()
    calls.clear()
    model[0].weight.grad = None
    model[4].weight.grad = None
    opt.step()
    assert sorted(calls) == [(2, 32, 32), (4, 32, 128)]  # the (32, 96) bucket has no gradients
    calls.clear()
    opt.param_groups[0]["ns_steps"] = 2
    _fill_grads(model)
    opt.step()
    assert sorted(calls) == [(2, 32, 32), (2, 32, 96), (4, 32, 128)]


def test_plan_text_and_available_backends():
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 16))
    opt = mk.Muon(model.named_parameters(), ns_dtype=torch.float16)
    text = str(opt.plan())
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "device", "method", "view", "backend", "path", "rank", "why"]
    assert any("0.weight" in l and "Muon" in l and "torch" in l and "baddbmm" in l and "float16" in l for l in lines)
    assert any("1.weight" in l and "AdamW" in l and "ndim 1 < 2" in l for l in lines)
    backends = mk.available_backends()
    assert set(backends) == {"torch", "triton", "cuda"}
    assert backends["torch"][0] is True
    if not torch.cuda.is_available():
        assert backends["triton"] == (False, "no CUDA device (torch.cuda.is_available() is False)")
        assert backends["cuda"][0] is False and backends["cuda"][1]


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    eager_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    compiled_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = mk.Muon(eager_model.parameters(), lr=0.02, ns_dtype=torch.float32)
    compiled = mk.Muon(compiled_model.parameters(), lr=0.02, ns_dtype=torch.float32)
    step = torch.compile(compiled.step)
    for seed in range(3):
        _fill_grads(eager_model, seed)
        _fill_grads(compiled_model, seed)
        eager.step()
        step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
