"""From parameters to buckets: matrix views, lr scales, bucketing and the printable plan.

The data path is one direction: optimizer → plan (buckets by device, dtype, oriented shape and
recurrence) → backend. A bucket is a list of matrices that are stacked and orthogonalized by one
backend call (or a few, when ``max_workspace_bytes`` splits it into chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .backends import select_backend
from .ns_config import NSConfig
from .recurrence import choose_algorithm
from .momentum_precision import LowPrecision
from .variants import Variant

MATRIX_VIEWS = ("flatten", "batch", "transposed", "batch_transposed")
# Views of weights stored (in, out) — transformers' Conv1D, fused (E, in, out) experts: the same
# orthogonalization (the polar factor of Wᵀ is that of W, transposed), the lr scale from (out, in).
_STORED_TRANSPOSED = ("transposed", "batch_transposed")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral")


@dataclass(frozen=True)
class MatrixView:
    """How a parameter is seen as ``batch`` matrices of ``rows × cols`` (DESIGN.md §1)."""

    batch: int
    rows: int
    cols: int
    kind: str  # "2d", "flatten", "batch", "transposed" or "batch_transposed"

    @property
    def transposed(self) -> bool:
        """Tall matrices are iterated as their transpose, so the Gram matrix is the small side."""
        return self.rows > self.cols

    @property
    def lr_shape(self) -> tuple[int, int]:
        """(out, in) of each matrix, which the lr scale is taken from: the stored (rows, cols), or
        (cols, rows) for weights stored (in, out)."""
        return (self.cols, self.rows) if self.kind in _STORED_TRANSPOSED else (self.rows, self.cols)

    @property
    def oriented(self) -> tuple[int, int]:
        return (self.cols, self.rows) if self.transposed else (self.rows, self.cols)

    def describe(self) -> str:
        if self.kind == "batch":
            return f"batch {self.batch}×({self.rows}×{self.cols})"
        if self.kind == "batch_transposed":
            return f"batch {self.batch}×({self.rows}×{self.cols}) stored (in, out)"
        if self.kind == "transposed":
            return f"{self.rows}×{self.cols} stored (in, out)"
        if self.kind == "flatten":
            return f"flatten {self.rows}×{self.cols}"
        return f"{self.rows}×{self.cols}"


def matrix_view(shape: torch.Size | tuple[int, ...], view: str | None, name: str) -> MatrixView:
    """The matrix view of a Muon parameter; raises ValueError when there is none or it is ambiguous.

    A group's ``matrix_view`` applies by ndim. 2D: ``"transposed"`` marks a weight stored
    (in, out); anything else is a plain (out, in) matrix. 3D: ``"batch"`` (E matrices),
    ``"batch_transposed"`` (E matrices stored (in, out)) or ``"flatten"`` (a Conv1d filter) must
    be said. 4D+: a convolution filter, always one ``out × in·kh·kw`` matrix, so a group that mixes
    MoE expert stacks (``"batch"``) and convs orthogonalizes each the right way.
    """
    shape = tuple(shape)
    if view is not None and view not in MATRIX_VIEWS:
        raise ValueError(f"matrix_view must be one of {MATRIX_VIEWS} or None, got {view!r} (parameter {name})")
    if len(shape) < 2:
        raise ValueError(
            f"parameter {name} with shape {shape} is in a group with use_muon=True, but Muon only "
            "orthogonalizes matrices (2D and up); put it in a group with use_muon=False (AdamW), "
            "e.g. with muon_kernels.param_groups(model)"
        )
    if len(shape) == 2:
        return MatrixView(1, shape[0], shape[1], "transposed" if view == "transposed" else "2d")
    if len(shape) == 3 and view in (None, "transposed"):
        raise ValueError(
            f"parameter {name} has 3D shape {shape}, which is ambiguous: set the group key "
            f"matrix_view='batch' to orthogonalize it as {shape[0]} matrices of {shape[1]}×{shape[2]} "
            f"(MoE expert stacks, stacked heads; 'batch_transposed' if each is stored (in, out)) or "
            f"matrix_view='flatten' for one {shape[0]}×{shape[1] * shape[2]} matrix (a Conv1d filter); "
            "muon_kernels.param_groups(model) sets it from the module"
        )
    if len(shape) == 3 and view in ("batch", "batch_transposed"):
        return MatrixView(shape[0], shape[1], shape[2], view)
    return MatrixView(1, shape[0], math.prod(shape[1:]), "flatten")


def lr_scale(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """Per-matrix factor on lr (DESIGN.md §1 scale rules), from the matrix view's rows and cols."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral":
        return math.sqrt(rows / cols)
    raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


@dataclass
class Entry:
    """One Muon matrix (a parameter, or a split piece of one) inside a bucket."""

    group: int
    param: torch.Tensor
    view: MatrixView
    scale: float
    part: tuple[int, int, int] | None = None  # (dim, start, size) of a split piece (muon_kernels/splits.py)
    seed: int = 0  # stochastic rounding of the momentum: this entry's stream (muon_kernels/momentum_precision.py)

    def piece(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the parameter, its gradient or momentum) seen through this entry's piece."""
        return t if self.part is None else t.narrow(*self.part)

    @property
    def target(self) -> torch.Tensor:
        """The parameter memory this entry updates."""
        return self.piece(self.param)


@dataclass
class Bucket:
    """Same device, dtype, oriented (m, n) and recurrence: one stacked backend call."""

    device: torch.device
    dtype: torch.dtype  # dtype of the update U that is stacked (the momentum buffer's)
    m: int
    n: int
    config: NSConfig
    ns_dtype: torch.dtype
    nesterov: bool
    momentum_form: str
    backend: ModuleType
    why: str  # why this backend serves the bucket (the dispatch rule that fired)
    algorithm: str = ""  # the Newton–Schulz algorithm and normalization, and why (ns_algorithm="auto")
    cautious: bool = False  # weight_decay_mode="cautious": decay only where W·O >= 0
    variant: Variant = Variant()  # NorMuon / hyperball (muon_kernels/variants.py)
    low_precision: LowPrecision = LowPrecision()  # int8 / stochastically rounded momentum
    entries: list[Entry] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # a backend's per-plan data (e.g. kernel address tables)

    @property
    def matrices(self) -> int:
        return sum(e.view.batch for e in self.entries)

    def matrix_bytes(self) -> int:
        """Workspace one matrix needs: the fp32 stack, X and X_next (m×n), and the m×m temporaries —
        A and B, or for Gram NS R, Z, Q, R·Z and the next R — at the sizes the backend allocates them
        (the cuda backend pads each dimension to a multiple of 128)."""
        ns = torch.finfo(self.ns_dtype).bits // 8
        pad = getattr(self.backend, "padded", lambda size: size)
        m, n = pad(self.m), pad(self.n)
        squares = 5 if self.config.algorithm == "gram" else 2
        return 4 * self.m * self.n + ns * (2 * m * n + squares * m * m)

    def chunks(self, max_workspace_bytes: int | None) -> list[tuple[int, int]]:
        """[start, stop) ranges of matrices so each chunk's workspace stays under the cap and under
        the backend's own per-call limit (the torch backend's on a CPU)."""
        total = self.matrices
        per_chunk = total if not max_workspace_bytes else max(1, max_workspace_bytes // self.matrix_bytes())
        per_call = getattr(self.backend, "matrices_per_call", lambda *args: None)(self.m, self.n, self.ns_dtype,
                                                                                  self.device)
        per_chunk = min(per_chunk, per_call or total)
        return [(s, min(s + per_chunk, total)) for s in range(0, total, per_chunk)]

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A work buffer that lives as long as the plan and is reused every step (a CPU's large
        allocations are fresh mmaps that page-fault on first touch, every time)."""
        buf = self.cache.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self.cache[name] = buf
        return buf

    def orthogonalize(self, stack: torch.Tensor, max_workspace_bytes: int | None) -> torch.Tensor:
        """One backend call per bucket, or one per chunk when the workspace cap (or the backend's
        per-call limit) splits it."""
        chunks = self.chunks(max_workspace_bytes)
        if len(chunks) == 1:
            return self.backend.orthogonalize(stack, self.config, self.ns_dtype)
        if stack.device.type == "cpu" and stack.shape[0] == self.matrices:
            out = self.buffer("orthogonalized", tuple(stack.shape), self.ns_dtype)
        else:
            out = torch.empty(stack.shape, dtype=self.ns_dtype, device=stack.device)
        for start, stop in chunks:
            out[start:stop] = self.backend.orthogonalize(stack[start:stop], self.config, self.ns_dtype)
        return out


def build_buckets(items) -> list[Bucket]:
    """``items``: (group index, param, view, scale, update dtype, config, ns_dtype, nesterov,
    momentum form, backend name, cautious weight decay, variant, low-precision momentum, split piece or
    None, seed). Groups that agree on all of these but the last two share buckets."""
    buckets: dict[tuple, Bucket] = {}
    for (group, p, view, scale, dtype, config, ns_dtype, nesterov, form, backend, cautious, variant, low, part,
         seed) in items:
        m, n = view.oriented
        key = (p.device, p.dtype, dtype, m, n, config, ns_dtype, nesterov, form, backend, cautious, variant, low)
        if key not in buckets:
            resolved, why = choose_algorithm(config, m, n, ns_dtype, p.device)
            if resolved.normalization == "aol":
                why += ", AOL preconditioning"
            buckets[key] = Bucket(p.device, dtype, m, n, resolved, ns_dtype, nesterov, form,
                                  *select_backend(backend, p.device, m, n, ns_dtype), why, cautious, variant, low)
        buckets[key].entries.append(Entry(group, p, view, scale, part, seed))
    return list(buckets.values())


@dataclass
class PlanRow:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    method: str
    view: str
    backend: str
    path: str
    why: str
    rank: str = "-"  # under torch.distributed: the rank that orthogonalizes it, and the layout


class Plan(list):
    """A list of ``PlanRow`` that prints as a table."""

    COLUMNS = ("name", "shape", "dtype", "device", "method", "view", "backend", "path", "rank", "why")

    def __init__(self, rows=(), notes=()):
        super().__init__(rows)
        self.notes = list(notes)  # routing notes (e.g. no output head identified), printed below the table

    def __str__(self) -> str:
        cells = [
            [
                r.name,
                "×".join(map(str, r.shape)) or "scalar",
                str(r.dtype).removeprefix("torch."),
                str(r.device),
                r.method,
                r.view,
                r.backend,
                r.path,
                r.rank,
                r.why,
            ]
            for r in self
        ]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(self.COLUMNS)]
        line = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
        return "\n".join([line(self.COLUMNS), line(["-" * w for w in widths]), *map(line, cells),
                          *(f"note: {n}" for n in self.notes)])
