"""The numbers a setting may be: what every check of a numeric setting (settings.py, ns_config.py,
variants.py) accepts, so one value is not taken by one setting and refused by the next."""

from __future__ import annotations

import numbers
from typing import Any

import torch


def is_real(value: Any) -> bool:
    """An int or float (not a bool), or a numpy real scalar: the scalars torch's ops take. Other
    ``numbers.Real`` types (``fractions.Fraction``) are refused: a torch op raises on one, which in
    the middle of a step would leave it half done."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, numbers.Real) and hasattr(value, "dtype"))


def number(name: str, value: Any, tensor: bool = False) -> float:
    """``value`` as a float where it is a real number (or, with ``tensor``, a 1-element real tensor,
    as torch's optimizers take for lr, betas and weight decay), else ValueError naming the setting —
    before anything compares or multiplies it (a string lr would otherwise fail in the middle of a
    step)."""
    if tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{name} must be a float or a 1-element real tensor, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        return float(value)
    if not is_real(value):
        raise ValueError(f"{name} must be a number (int or float){' or a 1-element tensor' if tensor else ''}, "
                         f"got {value!r}")
    return float(value)
