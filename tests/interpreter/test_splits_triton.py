"""Split parameters on the Triton backend (CPU interpreter) against the torch backend: row pieces
of an (out, in) matrix are contiguous and go through the fused kernels; column pieces of a weight
stored (in, out) are strided and take the torch path for momentum and update (the Newton–Schulz
kernels serve both). With NorMuon on, so the statistics kernel sees pieces too."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import fused
from oracles import rel_err


def _run(backend: str, adaptive: str):
    g = torch.Generator().manual_seed(2)
    qkv = torch.nn.Parameter(torch.randn(36, 12, generator=g))  # (out, in): q|k|v rows
    c_attn = torch.nn.Parameter(torch.randn(12, 36, generator=g))  # stored (in, out): q|k|v columns
    proj = torch.nn.Parameter(torch.randn(12, 12, generator=g))
    groups = [{"params": [qkv], "split_sizes": (12, 12, 12)},
              {"params": [c_attn], "split_sizes": (12, 12, 12), "matrix_view": "transposed"},
              {"params": [proj]}]
    opt = mk.Muon(groups, lr=0.05, backend=backend, ns_dtype=torch.float32, adaptive=adaptive, weight_decay=0.01)
    for _ in range(3):
        for p in (qkv, c_attn, proj):
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return (qkv, c_attn, proj), opt


@pytest.mark.parametrize("adaptive", ["none", "normuon"])
def test_split_pieces_on_triton_match_the_torch_backend(adaptive):
    ref, _ = _run("torch", adaptive)
    out, opt = _run("triton", adaptive)
    [bucket] = opt._buckets  # every piece and the projection: one 12×12 bucket
    assert bucket.backend.NAME == "triton" and bucket.matrices == 7
    row_pieces = [e.target for e in bucket.entries if e.part is not None and e.part[0] == 0]
    assert len(row_pieces) == 3 and fused.fusable(row_pieces)
    for a, b in zip(ref, out):
        assert rel_err(b.detach(), a.detach()) <= 2e-5
