"""Optimizer variants on a real GPU (marked ``gpu``; skipped without one): cautious weight decay in the
fused update of every backend against the torch backend on the same device."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import available_backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cautious_weight_decay_matches_torch_backend(backend, dtype):
    ok, why = available_backends(DEV)[backend]
    assert ok, f"backend {backend} unavailable on this GPU: {why}"
    torch.manual_seed(0)
    shapes = [(256, 1024), (1024, 256), (256, 1024)]
    ps = [torch.nn.Parameter(torch.randn(s, device=DEV).to(dtype)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opts = [mk.Muon(x, lr=0.05, weight_decay=0.5, weight_decay_mode="cautious", ns_dtype=torch.float32, backend=b)
            for x, b in ((ps, backend), (twins, "torch"))]
    for _ in range(3):
        grads = [torch.randn(s, device=DEV).to(dtype) for s in shapes]
        for group, opt in zip((ps, twins), opts):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            opt.step()
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    for p, q in zip(ps, twins):
        assert ((p.float() - q.float()).norm() / q.float().norm()).item() <= tol
