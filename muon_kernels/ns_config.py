"""Newton–Schulz coefficient presets and ``NSConfig``: the leaf module every other module imports.

Every backend runs the same recurrence on a stack ``X`` of shape (k, m, n) with m <= n:

    X = U / max(norm_scale * ||U||_F + norm_offset, floor)
    (normalization "aol": then X = diag(s) X with s_i = (Σ_j |X Xᵀ|_ij)^-1/2, docs/newton_schulz.md)
    for (a, b, c) in coefficients:
        A = X Xᵀ;  B = b A + c A A;  X = a X + B X

computed either as written (algorithm "standard") or on the m×m Gram matrix (algorithm "gram",
restarted before the steps in ``restarts``; muon_kernels/recurrence.py). ``NSConfig`` carries
everything that defines the recurrence, resolved once per param group, so backends never see preset
names. It imports nothing of this package, so it cannot be part of an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .real_number import is_real

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
# Turbo-Muon (Boissin et al. 2025, arXiv 2512.04632): 4 steps after AOL preconditioning; the
# coefficients of thib-s/flash-newton-schulz at commit cdb03db ("updated poly params"). Chosen over
# Polar Express's last four steps by measurement (docs/newton_schulz.md).
TURBO: tuple[Coefficients, ...] = (
    (4.6051, -9.6552, 5.6769),
    (4.7505, -6.0861, 2.1790),
    (2.7763, -2.3190, 0.5523),
    (2.4231, -2.2861, 0.8193),
)
PRESETS: dict[str, tuple[Coefficients, ...]] = {
    "keller": KELLER,
    "quintic": QUINTIC,
    "polar_express": POLAR_EXPRESS,
    "turbo": TURBO,
}
# (norm_scale, norm_offset) of the normalization each preset was derived for.
PRESET_NORMALIZATION: dict[str, tuple[float, float]] = {
    "keller": (1.0, 0.0),
    "quintic": (1.0, 0.0),
    "polar_express": (1.02, 1e-6),
    "turbo": (1.0, 0.0),
}
MAX_STEPS = 100  # torch.optim.Muon's bound: more steps than any coefficient set needs
# Steps a preset runs when ns_steps is None (a tuple or a per-step list runs DEFAULT_STEPS).
PRESET_STEPS: dict[str, int] = {"keller": 5, "quintic": 5, "polar_express": 5, "turbo": 4}
# The normalization a preset was derived for, used when ns_normalization is None.
PRESET_PRECONDITIONING: dict[str, str] = {"keller": "frobenius", "quintic": "frobenius",
                                          "polar_express": "frobenius", "turbo": "aol"}
DEFAULT_STEPS = 5
NS_ALGORITHMS = ("standard", "gram", "auto")
NS_NORMALIZATIONS = ("frobenius", "aol")
# Default Gram restarts, per iteration dtype: (first, every) — restart before steps first,
# first + every, ... (0-based). Measured (docs/newton_schulz.md): in 16 bits R's rounding noise in
# small or null directions is amplified ~a² per step with nothing re-anchoring it to X, so one
# restart (before step 2, gram-newton-schulz's default) let rank-deficient and condition-1e6 spectra
# reach errors of 0.4–14 where standard NS has 0.03–0.3 in a development sweep (the committed table:
# it holds at 5 steps, fails at 8); restarting every 2 steps (before 1, 3, ...)
# keeps them at standard NS's level. In fp32 five unrestarted steps stay within 2.5e-3 of the fp64
# recurrence on those spectra (50× closer than standard NS in bf16, the default) and eight do not
# (0.12), so fp32 restarts every 5 steps.
RESTART_SCHEDULE: dict[torch.dtype, tuple[int, int]] = {
    torch.bfloat16: (1, 2), torch.float16: (1, 2), torch.float32: (5, 5), torch.float64: (5, 5),
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
    normalization: str = "frobenius"  # or "aol": diagonal preconditioning after the Frobenius scaling
    algorithm: str = "standard"  # "gram" (m×m iteration), or "auto" until a plan resolves it per bucket
    restarts: tuple[int, ...] | None = None  # Gram restarts; None: RESTART_SCHEDULE for the iteration dtype

    @property
    def steps(self) -> int:
        return len(self.coefficients)

    @property
    def floor(self) -> float:
        return max(self.eps, NORM_FLOOR)

    @property
    def plain(self) -> bool:
        """The standard recurrence after Frobenius scaling only: what the one-call drivers (Triton's
        one-kernel path, the C++ driver) run; Gram NS and AOL go through muon_kernels.recurrence."""
        return self.algorithm == "standard" and self.normalization == "frobenius"

    def gram_restarts(self, ns_dtype: torch.dtype) -> tuple[int, ...]:
        """The steps before which a Gram iteration in ``ns_dtype`` restarts (0-based)."""
        if self.restarts is not None:
            return self.restarts
        first, every = RESTART_SCHEDULE[ns_dtype]
        return tuple(range(first, self.steps, every))


def _as_triple(value, where: str) -> Coefficients:
    try:
        values = () if isinstance(value, str) else tuple(value)
    except TypeError:
        values = ()
    triple = tuple(float(v) for v in values) if all(map(is_real, values)) else ()
    if len(triple) != 3:
        raise ValueError(
            f"ns_coefficients: {where} must be three numbers (a, b, c), got {value!r}; "
            f"or pass a preset name, one of {sorted(PRESETS)}"
        )
    return triple  # type: ignore[return-value]


def resolve_ns_config(ns_coefficients: CoefficientSpec, ns_steps: int | None, eps: float,
                      ns_algorithm: str = "standard", ns_normalization: str | None = None,
                      ns_gram_restarts: Sequence[int] | None = None) -> NSConfig:
    """Turn a group's Newton–Schulz settings into an ``NSConfig``.

    ``ns_steps=None`` runs a preset's own number of steps (``PRESET_STEPS``: 5, "turbo" 4), and 5
    for a tuple or a per-step list (as torch.optim.Muon's default ``ns_steps=5`` did). A preset or a list of per-step tuples shorter than ``ns_steps``
    repeats its last tuple (a single (a, b, c) is the one-element case); a longer list is cut to
    ``ns_steps``. ``ns_normalization=None`` is the preset's own ("aol" for "turbo", else
    "frobenius"). ``ns_gram_restarts`` (Gram only) lists the 0-based steps before which the Gram
    iteration restarts from X; None picks ``RESTART_SCHEDULE`` by iteration dtype.
    """
    # below MAX_STEPS as torch.optim.Muon requires (it refuses more at step(); here at construction)
    if ns_steps is not None and (isinstance(ns_steps, bool) or not isinstance(ns_steps, int)
                                 or not 0 <= ns_steps < MAX_STEPS):
        raise ValueError(f"ns_steps must be an int in [0, {MAX_STEPS}) (or None: the preset's own count), "
                         f"got {ns_steps!r}")
    if ns_algorithm not in NS_ALGORITHMS:
        raise ValueError(f"ns_algorithm must be one of {NS_ALGORITHMS}, got {ns_algorithm!r}")
    if ns_normalization is not None and ns_normalization not in NS_NORMALIZATIONS:
        raise ValueError(f"ns_normalization must be None (the preset's own) or one of {NS_NORMALIZATIONS}, "
                         f"got {ns_normalization!r}")
    norm = (1.0, 0.0)
    natural_steps, preconditioning = DEFAULT_STEPS, "frobenius"
    if isinstance(ns_coefficients, str):
        if ns_coefficients not in PRESETS:
            raise ValueError(
                f"ns_coefficients: unknown preset {ns_coefficients!r}; allowed presets are "
                f"{sorted(PRESETS)}, or a tuple (a, b, c), or a list of per-step tuples"
            )
        per_step = PRESETS[ns_coefficients]
        norm = PRESET_NORMALIZATION[ns_coefficients]
        natural_steps = PRESET_STEPS[ns_coefficients]
        preconditioning = PRESET_PRECONDITIONING[ns_coefficients]
    elif isinstance(ns_coefficients, (tuple, list)) and ns_coefficients and all(is_real(v) for v in ns_coefficients):
        per_step = (_as_triple(ns_coefficients, "the tuple"),)
    elif isinstance(ns_coefficients, (tuple, list)) and ns_coefficients:
        per_step = tuple(_as_triple(t, f"step {i}") for i, t in enumerate(ns_coefficients))
    else:
        raise ValueError(
            f"ns_coefficients must be a preset name {sorted(PRESETS)}, a tuple (a, b, c) or a "
            f"non-empty list of per-step tuples, got {ns_coefficients!r}"
        )
    if not is_real(eps) or not eps >= 0.0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if ns_steps is None:
        ns_steps = natural_steps
    steps = tuple(per_step[min(i, len(per_step) - 1)] for i in range(ns_steps))
    restarts = _check_restarts(ns_gram_restarts, ns_coefficients, per_step, ns_steps)
    return NSConfig(steps, float(eps), *norm, ns_normalization or preconditioning, ns_algorithm, restarts)


def _check_restarts(restarts, ns_coefficients, per_step, steps: int) -> tuple[int, ...] | None:
    if restarts is None:
        return None
    if isinstance(restarts, (str, bytes)) or not isinstance(restarts, (tuple, list)) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in restarts):
        raise ValueError(f"ns_gram_restarts must be None or a list of step indices, got {restarts!r}")
    restarts = tuple(sorted(set(restarts)))
    listed = len(per_step) if isinstance(ns_coefficients, (tuple, list)) and len(per_step) > 1 else steps
    last = min(steps, listed)
    if restarts and (restarts[0] < 1 or restarts[-1] >= last):
        what = (f"the per-step coefficient list has {listed} tuples" if listed < steps
                else f"ns_steps is {steps}")
        raise ValueError(f"ns_gram_restarts={list(restarts)}: a restart goes before one of the steps 1..{last - 1}, "
                         f"but {what}; pass restarts inside that range (or more per-step tuples)")
    return restarts


def check_ns_dtype(ns_dtype) -> torch.dtype:
    if ns_dtype not in NS_DTYPES:
        raise ValueError(
            f"ns_dtype must be one of torch.bfloat16, torch.float16, torch.float32, got {ns_dtype!r}"
        )
    return ns_dtype
