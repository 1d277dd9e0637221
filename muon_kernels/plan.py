"""From parameters to buckets: matrix views, lr scales, bucketing and the printable plan.

The data path is one direction: optimizer → plan (buckets by device, dtype, oriented shape and
recurrence) → backend. A bucket (muon_kernels/bucket.py) is a list of matrices that are stacked
and orthogonalized by one backend call (or a few, when ``max_workspace_bytes`` splits it into chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import momentum_precision, random_bits, splits, variants
from .backends import elementwise_backend, select_backend
from .bucket import MATRIX_VIEWS, Bucket, Entry, LowPrecision, MatrixView, Variant
from .ns_config import NSConfig
from .recurrence import choose_algorithm
from .settings import ADJUST_LR_FNS, label, ns_config


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
            f"parameter {name if 'shape' in name else f'{name} with shape {shape}'} is in a group with use_muon=True, "
            "but Muon only "
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


def check_params(group: dict, tensors: list[torch.Tensor], names: list[str]) -> None:
    """Raise ValueError, naming the parameter, for a Muon group parameter that cannot be planned: a
    complex one, one without a matrix view, split sizes that do not fit, int8 pieces off the blocks,
    or an explicitly requested backend that cannot run on its device."""
    labels = {"param_names": names} if names else {}
    for i, p in enumerate(tensors):
        name = label(labels, i, p)
        if torch.is_complex(p):
            raise ValueError(f"parameter {name}: Muon does not support complex parameters; step it with another "
                             "optimizer (e.g. torch.optim.AdamW), or keep its real and imaginary parts as two real "
                             "parameters")
        view = matrix_view(p.shape, group["matrix_view"], name)
        for part, _ in splits.pieces(view, group["split_sizes"], group["num_heads"], name):
            if group["momentum_dtype"] == momentum_precision.INT8:
                momentum_precision.check_piece(part, name)
        select_backend(group["backend"], p.device)  # raises now if an explicit backend can't run


class Item(NamedTuple):
    """One Muon matrix (a parameter or a split piece) and everything its bucket depends on."""

    group: int
    param: torch.Tensor
    view: MatrixView
    scale: float
    dtype: torch.dtype  # the update's (the stack's)
    config: NSConfig
    ns_dtype: torch.dtype
    nesterov: bool
    momentum_form: str
    backend: str
    cautious: bool
    variant: Variant
    low_precision: LowPrecision
    part: tuple[int, int, int] | None  # a split piece
    seed: int  # stochastic rounding stream


def group_items(group_index: int, group: dict, params: list[torch.Tensor]):
    """The ``Item`` of every matrix (split pieces apart) of ``params``, Muon parameters of ``group``."""
    config = ns_config(group)
    index = {id(p): i for i, p in enumerate(group["params"])}
    variant = variants.variant(group)
    low = momentum_precision.mode(group)
    if group["backend"] != "auto":  # raises if a backend set after construction cannot run there
        for device in dict.fromkeys(p.device for p in params):
            select_backend(group["backend"], device)
    for p in params:
        name = label(group, index[id(p)], p)
        whole = matrix_view(p.shape, group["matrix_view"], name)
        for part, view in splits.pieces(whole, group["split_sizes"], group["num_heads"], name) or [(None, whole)]:
            if low.int8:
                momentum_precision.check_piece(part, name)
            yield Item(
                group_index, p, view,
                # the hyperball normalizes the update, so a scale on it would have no effect
                1.0 if variant.hyperball else lr_scale(*view.lr_shape, group["adjust_lr_fn"]),
                momentum_precision.stack_dtype(group, p.dtype), config, group["ns_dtype"], group["nesterov"],
                group["momentum_form"], group["backend"], group["weight_decay_mode"] == "cautious", variant, low, part,
                random_bits.entry_seed(group_index, index[id(p)], part) if low.stochastic else 0,
            )


def build_buckets(items) -> list[Bucket]:
    """Buckets of ``items`` (``Item``): items that agree on everything but their group, parameter,
    view, scale, split piece and seed share one."""
    buckets: dict[tuple, Bucket] = {}
    for it in items:
        m, n = it.view.oriented
        p = it.param
        key = (p.device, p.dtype, it.dtype, m, n, it.config, it.ns_dtype, it.nesterov, it.momentum_form, it.backend,
               it.cautious, it.variant, it.low_precision)
        if key not in buckets:
            resolved, why = choose_algorithm(it.config, m, n, it.ns_dtype, p.device)
            if resolved.normalization == "aol":
                why += ", AOL preconditioning"
            backend, how = select_backend(it.backend, p.device, m, n, it.ns_dtype)
            elementwise = elementwise_backend(it.backend, p.device)
            if elementwise is not None and elementwise is not backend:
                how += f"; momentum and update on the {elementwise.NAME} fused kernels"
            buckets[key] = Bucket(p.device, it.dtype, m, n, resolved, it.ns_dtype, it.nesterov, it.momentum_form,
                                  backend, how, why, it.cautious, it.variant, it.low_precision,
                                  elementwise=elementwise, request=it.config if it.backend == "auto" else None)
        buckets[key].entries.append(Entry(it.group, p, it.view, it.scale, it.part, it.seed))
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


def describe(param_groups: list[dict], buckets: list[Bucket], placements) -> Plan:
    """The printable plan: every parameter of ``param_groups``, Muon or AdamW, its matrix view,
    backend, kernel path and why. ``placements``: per bucket, (layout, owner rank of each entry or
    None) under torch.distributed (muon_kernels/distributed.py)."""
    rows = Plan()
    where: dict[int, list] = {}  # per parameter, its entries (several for a split one)
    for b, (layout, owners) in zip(buckets, placements):
        for j, e in enumerate(b.entries):
            where.setdefault(id(e.param), []).append((b, e, layout, owners[j] if owners else None))
    for gi, group in enumerate(param_groups):
        names = group.get("param_names") or [f"group{gi}[{i}]" for i in range(len(group["params"]))]
        reasons = group.get("param_reasons")  # name → why (muon_kernels.param_groups)
        reasons = reasons if isinstance(reasons, dict) else {}
        rows.notes += [n for n in group.get("routing_notes", ()) if n not in rows.notes]
        for name, p in zip(names, group["params"]):
            reason = reasons.get(name)
            common = (name, tuple(p.shape), p.dtype, p.device)
            if not group["use_muon"]:
                why = reason or (f"ndim {p.ndim} < 2" if p.ndim < 2 else "group has use_muon=False")
                rows.append(PlanRow(*common, "AdamW", "-", "torch", "fused/foreach adamw", why))
            elif id(p) not in where:
                rows.append(PlanRow(*common, "skip", "-", "-", "-", "zero-size parameter"))
            else:
                rows.append(_muon_row(common, group, reason, where[id(p)]))
    return rows


def _muon_row(common: tuple, group: dict, reason: str | None, entries: list) -> PlanRow:
    b, e, _, _ = entries[0]
    path, how = b.backend.kernel_path(b.m, b.n, b.ns_dtype, b.device, b.config, b.path)
    dtype = str(b.ns_dtype).removeprefix("torch.")
    variant = "".join(f"; {v}" for v in ("cautious weight decay" if b.cautious else "", b.variant.describe(),
                                         b.low_precision.describe()) if v)
    # m×n as iterated: a view with more rows than columns is orthogonalized transposed
    buckets_of = "; ".join(dict.fromkeys(f"bucket of {x.matrices} matri{'x' if x.matrices == 1 else 'ces'}, "
                                         f"iterated as {x.m}×{x.n} {dtype}" for x, *_ in entries))
    view = e.view.describe()
    if e.part is not None:
        split = splits.describe(group["split_sizes"], group["num_heads"])
        view = f"{len(entries)} pieces: " + ", ".join(dict.fromkeys(x.view.describe() for _, x, *_ in entries))
        reason = f"{reason}; {split}" if reason else split
    why = (f"{reason}; " if reason else "") + f"{b.why}; {b.algorithm}{variant}; {how}; {buckets_of}"
    ranks = dict.fromkeys("local" if o is None else f"{o} ({lay})" for _, _, lay, o in entries)
    return PlanRow(*common, "Muon", view, b.backend.NAME, path, why, ", ".join(ranks))
