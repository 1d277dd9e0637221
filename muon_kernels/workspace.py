"""Work buffers of the kernel backends, and the debug switch that poisons them.

``MUON_KERNELS_DEBUG_FILL=nan`` fills every buffer the Triton and CUDA backends take from
``torch.empty`` with NaN, so a kernel that reads an element nobody wrote (the "padding holds
zeros" contract of the CUDA buffers, a stack slot a fused kernel missed) fails loudly instead of
passing by luck of zeroed fresh memory. The GPU tests and ``make gpu-check`` run with it; it costs
one fill per buffer, so it is off by default. Read on every call, so a test can switch it.
"""

from __future__ import annotations

import os

import torch

FILL_VARIABLE = "MUON_KERNELS_DEBUG_FILL"


def _fill_value() -> float | None:
    value = os.environ.get(FILL_VARIABLE, "")
    if value in ("", "0", "off"):
        return None
    if value != "nan":
        raise ValueError(f"{FILL_VARIABLE} must be 'nan' (or unset), got {value!r}")
    return float("nan")


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or NaN-filled under ``MUON_KERNELS_DEBUG_FILL=nan`` (floating dtypes)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    fill = _fill_value()
    if fill is not None and out.is_floating_point():
        out.fill_(fill)
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, dtype=t.dtype, device=t.device)
