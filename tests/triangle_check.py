"""The symmetric kernel's program id → triangle tile map, checked exactly in a kernel (on the
interpreter, tests/interpreter/test_edge_contract_triton.py; on a GPU, tests/gpu/test_triton_gpu.py)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from muon_kernels.triton_kernels.symmetric_matmul import _triangle_coords


@triton.jit
def _triangle_kernel(Pids, I, J, N: tl.constexpr):
    k = tl.arange(0, N)
    i, j = _triangle_coords(tl.load(Pids + k))
    tl.store(I + k, i)
    tl.store(J + k, j)


def check(device: torch.device) -> None:
    """pid = j(j+1)/2 + i, i <= j: exact on both sides of each column's first pid up to ~2^28 tiles,
    where fp32's sqrt(8·pid + 1) lands one off and the kernel's corrections must put j back."""
    columns = sorted({*range(1, 600), *(int(c) for c in torch.logspace(3, math.log10(23169), 1400).tolist())})
    firsts = torch.tensor([c * (c + 1) // 2 for c in columns], dtype=torch.int64)
    pids = torch.cat([firsts - 1, firsts, firsts + 1]).to(torch.int32)
    n = triton.next_power_of_2(pids.numel())
    pids = torch.cat([pids, pids[:1].expand(n - pids.numel())]).contiguous()
    i, j = torch.empty_like(pids, device=device), torch.empty_like(pids, device=device)
    _triangle_kernel[(1,)](pids.to(device), i, j, N=n)
    i, j, pids = i.cpu().long(), j.cpu().long(), pids.long()
    exact = ((8 * pids.double() + 1).sqrt().floor().long() - 1) // 2
    for _ in range(2):  # the fp64 root is exact to within one at these sizes: settle it in integers
        exact = torch.where((exact + 1) * (exact + 2) // 2 <= pids, exact + 1, exact)
        exact = torch.where(exact * (exact + 1) // 2 > pids, exact - 1, exact)
    assert torch.equal(j, exact)
    assert torch.equal(i, pids - exact * (exact + 1) // 2) and bool((i <= j).all())
