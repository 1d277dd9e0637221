"""What the fused backends (``triton``, ``cuda``) share: which tensors their multi-tensor kernels
can address (the per-entry scalar tables they read are muon_kernels/scalars.py's)."""

from __future__ import annotations

import torch

from ..bucket import Bucket

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fusable(tensors) -> bool:
    """The fused kernels address tensors as flat contiguous memory, or as rows of a wider matrix (a
    split piece that is a column block: stride (ld, 1)), and compute in fp32; other layouts
    (channels_last, transposed views) and fp64 tensors take the torch path."""
    return all(t.dtype in FUSED_DTYPES and (t.is_contiguous() or (t.ndim == 2 and t.stride(1) == 1))
               for t in tensors)


def same_layout(bucket: Bucket, tensors) -> bool:
    """Gradients and buffers are addressed with the parameters' row strides: they must share them."""
    return all(t.stride() == e.target.stride() or (t.is_contiguous() and e.target.is_contiguous())
               for t, e in zip(tensors, bucket.entries))


def row_stride(e) -> int:
    """Elements between two rows of the entry's memory: its columns, or the wider parameter's for a
    split piece that is a column block."""
    t = e.target
    return e.view.cols if t.is_contiguous() else t.stride(0)
