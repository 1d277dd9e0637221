"""Newton–Schulz coefficient presets and ``NSConfig``: the leaf module every other module imports.

Every backend runs the same recurrence on a stack ``X`` of shape (k, m, n) with m <= n:

    X = U / max(norm_scale * ||U||_F + norm_offset, floor)
    for (a, b, c) in coefficients:
        A = X Xᵀ;  B = b A + c A A;  X = a X + B X

``NSConfig`` carries everything that defines that recurrence, resolved once per param group, so
backends never see preset names. It imports nothing of this package, so it cannot be part of an
import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Coefficients = tuple[float, float, float]
CoefficientSpec = Union[str, Coefficients, Sequence[Coefficients]]

KELLER: tuple[Coefficients, ...] = ((3.4445, -4.7750, 2.0315),)
QUINTIC: tuple[Coefficients, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# Amsel et al. 2025, 5 steps, safety 2e-2, cushion 0.02. Only valid with its own normalization
# ||U||·1.02 + 1e-6, which the preset carries (see PRESET_NORMALIZATION).
POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
PRESETS: dict[str, tuple[Coefficients, ...]] = {
    "keller": KELLER,
    "quintic": QUINTIC,
    "polar_express": POLAR_EXPRESS,
}
# (norm_scale, norm_offset) of the normalization each preset was derived for.
PRESET_NORMALIZATION: dict[str, tuple[float, float]] = {
    "keller": (1.0, 0.0),
    "quintic": (1.0, 0.0),
    "polar_express": (1.02, 1e-6),
}
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# eps = 0 must still orthogonalize tiny gradients and map a zero matrix to zeros (0 / tiny = 0),
# so the denominator never drops below fp32's smallest normal.
NORM_FLOOR = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class NSConfig:
    """A fully resolved Newton–Schulz recurrence: one (a, b, c) per step, and the normalization."""

    coefficients: tuple[Coefficients, ...]
    eps: float
    norm_scale: float = 1.0
    norm_offset: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.coefficients)

    @property
    def floor(self) -> float:
        return max(self.eps, NORM_FLOOR)


def _as_triple(value, where: str) -> Coefficients:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3:
        raise ValueError(
            f"ns_coefficients: {where} must be three numbers (a, b, c), got {value!r}; "
            f"or pass a preset name, one of {sorted(PRESETS)}"
        )
    return triple  # type: ignore[return-value]


def resolve_ns_config(ns_coefficients: CoefficientSpec, ns_steps: int, eps: float) -> NSConfig:
    """Turn a group's ``ns_coefficients``/``ns_steps``/``eps`` into an ``NSConfig``.

    A preset or a list of per-step tuples shorter than ``ns_steps`` repeats its last tuple
    (a single (a, b, c) is the one-element case); a longer list is cut to ``ns_steps``.
    """
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or ns_steps < 0:
        raise ValueError(f"ns_steps must be an int >= 0, got {ns_steps!r}")
    norm = (1.0, 0.0)
    if isinstance(ns_coefficients, str):
        if ns_coefficients not in PRESETS:
            raise ValueError(
                f"ns_coefficients: unknown preset {ns_coefficients!r}; allowed presets are "
                f"{sorted(PRESETS)}, or a tuple (a, b, c), or a list of per-step tuples"
            )
        per_step = PRESETS[ns_coefficients]
        norm = PRESET_NORMALIZATION[ns_coefficients]
    elif isinstance(ns_coefficients, (tuple, list)) and ns_coefficients and all(
        isinstance(v, (int, float)) for v in ns_coefficients
    ):
        per_step = (_as_triple(ns_coefficients, "the tuple"),)
    elif isinstance(ns_coefficients, (tuple, list)) and ns_coefficients:
        per_step = tuple(_as_triple(t, f"step {i}") for i, t in enumerate(ns_coefficients))
    else:
        raise ValueError(
            f"ns_coefficients must be a preset name {sorted(PRESETS)}, a tuple (a, b, c) or a "
            f"non-empty list of per-step tuples, got {ns_coefficients!r}"
        )
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    steps = tuple(per_step[min(i, len(per_step) - 1)] for i in range(ns_steps))
    return NSConfig(steps, float(eps), *norm)


def check_ns_dtype(ns_dtype) -> torch.dtype:
    if ns_dtype not in NS_DTYPES:
        raise ValueError(
            f"ns_dtype must be one of torch.bfloat16, torch.float16, torch.float32, got {ns_dtype!r}"
        )
    return ns_dtype
