"""Cautious weight decay in the fused Triton update kernel (CPU interpreter) against the torch path,
on the same orthogonalized stack: W·decay only where W·O >= 0, zeros counting as agreeing."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from oracles import rel_err


def _apply(backend: str, dtype: torch.dtype, mode: str):
    g = torch.Generator().manual_seed(8)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(12, 20), (20, 12), (12, 20)]]
    with torch.no_grad():
        ps[0][0, :5] = 0.0  # exact zeros in W
    opt = mk.Muon(ps, lr=0.1, weight_decay=0.5, weight_decay_mode=mode, backend=backend, ns_dtype=torch.float32)
    [bucket], _ = opt._plan_buckets([(0, opt.param_groups[0], ps)])
    ortho = torch.randn(bucket.matrices, bucket.m, bucket.n, generator=g)
    ortho[1, :3] = 0.0  # exact zeros in O
    with torch.no_grad():  # as inside Muon.step()
        bucket.backend.apply_update(bucket, ortho, opt.param_groups)
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_cautious_update_matches_the_torch_path(dtype):
    tol = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    torch_out, triton_out = _apply("torch", dtype, "cautious"), _apply("triton", dtype, "cautious")
    for a, b in zip(torch_out, triton_out):
        assert rel_err(b, a) <= tol
    decoupled = _apply("triton", dtype, "decoupled")
    assert any(rel_err(a, b) > 1e-2 for a, b in zip(triton_out, decoupled))  # the mask is really applied
