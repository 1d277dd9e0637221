"""fp32 products accumulated in one serial FMA chain per output, emulated exactly on the CPU.

Both fp32 ("ieee") kernel paths accumulate each output element in a single chain over K, k
ascending: the CUDA backend's SimtGemm (csrc/gemm.cuh: ``acc[i][j] = fmaf(a, b, acc[i][j])`` over
the whole K extent) and Triton's FMA lowering of ``tl.dot``. cuBLAS picks other orders (a split-K
for outputs with few tiles), so its error is not the yardstick for these kernels' own: this is.

The FMA is emulated in fp64 (the product of two fp32 values is exact in fp64; the sum then rounds
once to fp64 and once to fp32, which differs from one rounding only on exact fp64 ties). On the
first H200 run the CUDA fp32 symmetric kernel's error at (1, 300, 700) was 4.182481158112461e-07
relative; this emulation gives 4.182481158112e-07 on the same input.
"""

from __future__ import annotations

import torch


def serial_fma_matmul(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """fp32 ``P @ Q`` for (..., m, k) and (..., k, n) stacks, every output one FMA chain over k."""
    P, Q = P.float().cpu().double(), Q.float().cpu().double()
    acc = torch.zeros(*P.shape[:-1], Q.shape[-1], dtype=torch.float64)
    for k in range(P.shape[-1]):
        acc.addcmul_(P[..., :, k, None], Q[..., None, k, :])
        acc = acc.float().double()
    return acc.float()


def fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def symmetric_epilogue(acc: torch.Tensor, alpha: float, d: torch.Tensor | None, beta: float) -> torch.Tensor:
    """csrc/newton_schulz.cu SymmetricEpilogue in fp32: v = alpha·acc; v = fma(beta, d, v)."""
    v = (fp32(alpha) * acc.double()).float()
    if d is not None:
        v = (fp32(beta) * d.float().cpu().double() + v.double()).float()
    return v


def update_epilogue(acc: torch.Tensor, a: float, x: torch.Tensor) -> torch.Tensor:
    """csrc/newton_schulz.cu UpdateEpilogue in fp32: fma(a, x, acc)."""
    return (fp32(a) * x.float().cpu().double() + acc.double()).float()
