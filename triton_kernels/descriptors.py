"""TMA tensor descriptors for the matmul kernels' operands (Hopper's copy engine): the host-side
descriptor, and ``load_tile``, the kernels' one tile load (descriptor or pointers).

A descriptor covers a whole (batch, rows, cols) stack with a (1, block_rows, block_cols) box: the
copy engine zero-fills what lies outside a matrix, so masked tiles need no masks and a box never
reads into the next matrix of the batch. ``triton.tools.tensor_descriptor.TensorDescriptor`` is
passed by value as a kernel parameter (no device allocation, CUDA-graph capturable) and exists in
every Triton this package supports (3.6…3.9), interpreter included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .config import arch_of, is_interpreting

_ALIGN = 16  # bytes: TMA's requirement on the base address and on every stride but the last


def supports_tma(device: torch.device) -> bool:
    """sm_90 and newer have the tensor memory accelerator; the interpreter emulates descriptors."""
    if is_interpreting() or device.type != "cuda":
        return True
    return arch_of(device.index if device.index is not None else torch.cuda.current_device()) >= 90


def describable(t: torch.Tensor) -> bool:
    """Whether TMA can read ``t`` (3-D): unit last stride, 16-byte aligned base and other strides."""
    size = t.element_size()
    return (t.ndim == 3 and t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % _ALIGN == 0
            and all(s * size % _ALIGN == 0 for s in t.stride()[:-1]))


def descriptor(t: torch.Tensor, block: tuple[int, int]) -> TensorDescriptor | None:
    """A descriptor of the (batch, rows, cols) stack ``t`` with a (1, *block) box, or None where TMA
    cannot read it (a transposed view, unaligned rows, a device without TMA): the caller then
    takes its pointer path, with the same accumulation order."""
    if not (describable(t) and supports_tma(t.device)):
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, *block])


@triton.jit
def load_tile(X, X_desc, batch, row0, col0, rows, cols, R, C, stride_r, stride_c,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TMA: tl.constexpr, UPCAST: tl.constexpr):
    """X[batch][row0 : row0 + BLOCK_R, col0 : col0 + BLOCK_C] of an R×C matrix, zeros outside it:
    one descriptor load (the copy engine zero-fills), or masked pointer loads (``rows``/``cols``:
    the same ranges as int64 index vectors; X already offset to the batch there)."""
    if TMA:
        x = X_desc.load([batch, row0, col0]).reshape(BLOCK_R, BLOCK_C)
    else:
        x = tl.load(X + rows[:, None] * stride_r + cols[None, :] * stride_c,
                    mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0)
    if UPCAST:  # the CPU interpreter multiplies raw bf16 bit patterns; give it fp32
        x = x.to(tl.float32)
    return x
