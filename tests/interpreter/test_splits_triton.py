"""Split parameters on the Triton backend (CPU interpreter) against the torch backend: row pieces
of an (out, in) matrix are contiguous, column pieces of a weight stored (in, out) (GPT-2's c_attn)
are rows of a wider matrix; both go through the fused momentum and update kernels (the torch path
is trapped), with NorMuon and with stochastically rounded bf16 momentum on."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import fused, torch_backend
from oracles import rel_err


def _run(backend: str, **options):
    g = torch.Generator().manual_seed(2)
    qkv = torch.nn.Parameter(torch.randn(36, 12, generator=g))  # (out, in): q|k|v rows
    c_attn = torch.nn.Parameter(torch.randn(12, 36, generator=g))  # stored (in, out): q|k|v columns
    proj = torch.nn.Parameter(torch.randn(12, 12, generator=g))
    groups = [{"params": [qkv], "split_sizes": (12, 12, 12)},
              {"params": [c_attn], "split_sizes": (12, 12, 12), "matrix_view": "transposed"},
              {"params": [proj]}]
    opt = mk.Muon(groups, lr=0.05, backend=backend, ns_dtype=torch.float32, weight_decay=0.01, **options)
    for _ in range(3):
        for p in (qkv, c_attn, proj):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return (qkv, c_attn, proj), opt


@pytest.mark.parametrize("options", [{"adaptive": "none"}, {"adaptive": "normuon"},
                                     {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"}])
def test_split_pieces_on_triton_match_the_torch_backend(options, monkeypatch):
    ref, ref_opt = _run("torch", **options)

    def trapped(*args, **kwargs):
        raise AssertionError("the Triton backend fell back to the torch path")

    monkeypatch.setattr(torch_backend, "momentum_stack", trapped)
    monkeypatch.setattr(torch_backend, "apply_update", trapped)
    out, opt = _run("triton", **options)
    [bucket] = opt._buckets  # every piece and the projection: one 12×12 bucket
    assert bucket.backend.NAME == "triton" and bucket.matrices == 7
    column_pieces = [e.target for e in bucket.entries if e.part is not None and e.part[0] == 1]
    assert len(column_pieces) == 3 and not any(t.is_contiguous() for t in column_pieces)
    assert fused.fusable([e.target for e in bucket.entries])
    for a, b in zip(ref, out):
        assert rel_err(b.detach(), a.detach()) <= 2e-5
        for key, value in ref_opt.state[a].items():  # bf16 and int64 state: the same bits
            if value.dtype == torch.float32:
                assert rel_err(opt.state[b][key], value) <= 1e-5, key
            else:
                assert torch.equal(opt.state[b][key], value), key
