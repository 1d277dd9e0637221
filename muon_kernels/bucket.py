"""What the planner hands to the backends: matrix views, bucket entries, buckets.

A leaf module: it imports nothing of this package but ``ns_config``, so every other module (the
planner, the backends, the variants, the distributed path) can import these types without forming
an import cycle (tests/test_structure.py walks the import graph and fails on any).

A bucket is a list of matrices that one backend call orthogonalizes (or a few, when
``max_workspace_bytes`` splits it into chunks; a local bucket over that cap is planned as several:
``Bucket.within``). Its ``layout`` says how the backends' momentum and
update functions lay its entries out in the tensor between them:

- ``"stack"``: a (K, m, n) stack of the oriented matrices (tall ones transposed), which Newton–Schulz
  takes as it is;
- ``"rows"``: each entry's values back to back in its own row-major layout (one flat tensor). An
  FSDP2 rank's shard bucket has this layout: its entries are the rank's rows of each matrix, which
  the all-to-all ships to the matrix's owner as they lie (muon_kernels/distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import ModuleType

import torch

from .ns_config import NSConfig
from .workspace import Scratch

MATRIX_VIEWS = ("flatten", "batch", "transposed", "batch_transposed")
# Views of weights stored (in, out) — transformers' Conv1D, fused (E, in, out) experts: the same
# orthogonalization (the polar factor of Wᵀ is that of W, transposed), the lr scale from (out, in).
STORED_TRANSPOSED = ("transposed", "batch_transposed")


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
        return (self.cols, self.rows) if self.kind in STORED_TRANSPOSED else (self.rows, self.cols)

    @property
    def oriented(self) -> tuple[int, int]:
        return (self.cols, self.rows) if self.transposed else (self.rows, self.cols)

    @property
    def numel(self) -> int:
        return self.batch * self.rows * self.cols

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


@dataclass(frozen=True)
class Variant:
    """The post-orthogonalization settings a bucket shares (part of its key): NorMuon and the
    hyperball (muon_kernels/variants.py)."""

    normuon: bool = False
    beta2: float = 0.95
    normuon_eps: float = 1e-10
    hyperball: bool = False
    hyperball_eps: float = 1e-8

    @property
    def active(self) -> bool:
        return self.normuon or self.hyperball

    def describe(self) -> str:
        parts = [f"NorMuon (β2={self.beta2:g})"] if self.normuon else []
        return "; ".join(parts + (["hyperball"] if self.hyperball else []))


@dataclass(frozen=True)
class LowPrecision:
    """How a bucket stores its momentum, beyond a plain dtype (part of the bucket key):
    muon_kernels/momentum_precision.py."""

    int8: bool = False
    stochastic: bool = False

    @property
    def active(self) -> bool:
        return self.int8 or self.stochastic

    def describe(self) -> str:
        kind = "int8 momentum (blocks of 256)" if self.int8 else "bf16 momentum"
        return f"{kind}, {'stochastic' if self.stochastic else 'nearest'} rounding" if self.active else ""


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard), told by its attributes (no torch.distributed import)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class Entry:
    """One Muon matrix (a parameter, or a split piece of one) inside a bucket; in an FSDP2 shard
    bucket, this rank's rows of it."""

    group: int
    param: torch.Tensor
    view: MatrixView  # a shard entry's: its local rows' (batch, rows, cols)
    scale: float
    part: tuple[int, int, int] | None = None  # (dim, start, size) of a split piece (muon_kernels/splits.py)
    seed: int = 0  # stochastic rounding of the momentum: this entry's stream (muon_kernels/momentum_precision.py)
    shard: tuple[int, int] | None = None  # FSDP2: (start, size) of this entry's rows in the rank's local shard
    offset: int = 0  # FSDP2: index of this rank's first element within the whole entry (its random bits)

    def piece(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the parameter, its gradient or momentum, laid out like the parameter) seen through
        this entry: its split piece, and for a shard entry the rank's rows of it, from the local shard."""
        if self.shard is not None:
            rows = local_tensor(t).narrow(0, *self.shard)  # a row piece's rows, or all the rank's rows
            return rows if self.part is None or self.part[0] == 0 else rows.narrow(*self.part)
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
    layout: str = "stack"  # "stack" or "rows" (module docstring)
    path: str | None = None  # the backend's kernel path chosen by measurement (None: the backend's own rule)
    elementwise: ModuleType | None = None  # the backend of the momentum and update (None: ``backend``)
    request: NSConfig | None = None  # backend="auto": the group's config before "auto" was resolved

    def momentum_stack(self, grads, bufs, groups: list[dict], state) -> torch.Tensor:
        """The momentum step and the updates U laid out as ``layout`` says (the elementwise backend's)."""
        return (self.elementwise or self.backend).momentum_stack(self, grads, bufs, groups, state)

    def apply_update(self, ortho: torch.Tensor, groups: list[dict], state) -> None:
        """Decay and update of every entry from ``ortho`` (laid out as ``momentum_stack`` returned)."""
        (self.elementwise or self.backend).apply_update(self, ortho, groups, state)

    @property
    def matrices(self) -> int:
        return sum(e.view.batch for e in self.entries)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The shape of the tensor between the momentum and the update: (K, m, n), or (elements,)."""
        if self.layout == "rows":
            return (sum(e.view.numel for e in self.entries),)
        return (self.matrices, self.m, self.n)

    def transposed_in_stack(self, e: Entry) -> bool:
        """Whether entry ``e`` lies transposed between the momentum and the update (a tall matrix in a stack)."""
        return self.layout == "stack" and e.view.transposed

    def offsets(self) -> list[int]:
        """Where each entry starts between the momentum and the update: its first matrix in the
        stack, or its first element in the rows layout. Fixed for a plan, so computed once."""
        if "offsets" not in self.cache:
            offsets, offset = [], 0
            for e in self.entries:
                offsets.append(offset)
                offset += e.view.numel if self.layout == "rows" else e.view.batch
            self.cache["offsets"] = offsets
        return self.cache["offsets"]

    def slot(self, stack: torch.Tensor, index: int, copy: bool = False) -> torch.Tensor | None:
        """Entry ``index``'s part of ``stack`` in its parameter's shape: a view, or None where that
        is no view (a transposed conv filter) — a copy then, with ``copy``."""
        e, start = self.entries[index], self.offsets()[index]
        if self.layout == "rows":
            return stack[start: start + e.view.numel].view(e.target.shape)
        part = stack[start: start + e.view.batch]
        if e.view.transposed:
            part = part.mT
        try:
            return part.view(e.target.shape)
        except RuntimeError:
            return part.reshape(e.target.shape) if copy else None

    def matrix_bytes(self) -> int:
        """Workspace one matrix needs: the fp32 stack, X and X_next (m×n), and the m×m temporaries —
        A and B, or for Gram NS R, Z, Q, R·Z and the next R — at the sizes the backend allocates them
        (the cuda backend pads each dimension to a multiple of 128). A bound: a step's consumed stack
        holds one of X and X_next."""
        ns = torch.finfo(self.ns_dtype).bits // 8
        pad = getattr(self.backend, "padded", lambda size: size)
        m, n = pad(self.m), pad(self.n)
        squares = 5 if self.config.algorithm == "gram" else 2
        return 4 * self.m * self.n + ns * (2 * m * n + squares * m * m)

    def chunks(self, max_workspace_bytes: int | None, total: int | None = None) -> list[tuple[int, int]]:
        """[start, stop) ranges of ``total`` matrices (default: the bucket's) so each chunk's
        workspace stays under the cap and under the backend's own per-call limit (the torch
        backend's on a CPU)."""
        total = self.matrices if total is None else total
        per_chunk = total if not max_workspace_bytes else max(1, max_workspace_bytes // self.matrix_bytes())
        per_call = getattr(self.backend, "matrices_per_call", lambda *args: None)(self.m, self.n, self.ns_dtype,
                                                                                  self.device)
        per_chunk = max(1, min(per_chunk, per_call or total))
        return [(s, min(s + per_chunk, total)) for s in range(0, total, per_chunk)]

    def within(self, max_workspace_bytes: int | None) -> list["Bucket"]:
        """This bucket as consecutive buckets of whole entries whose working set — the stack included,
        which ``chunks`` cannot bound: the momentum writes it whole — stays under the cap, as even as
        the entries allow (equal shapes share ``backend="auto"``'s measurements). One entry larger
        than the cap is a bucket of its own, chunked in ``orthogonalize``. The stack, its update and
        the products then take the cap, not the bucket's size: a LLaMA-1B step kept a 3.2 GB fp32 stack
        and a 1.6 GB update of its 48 MLP matrices beside 1 GB chunks."""
        if not max_workspace_bytes or len(self.entries) < 2:
            return [self]
        per_bucket = max(1, max_workspace_bytes // self.matrix_bytes())
        if self.matrices <= per_bucket:
            return [self]
        target = -(-self.matrices // -(-self.matrices // per_bucket))  # even sizes, none above per_bucket
        parts, size = [[]], 0
        for e in self.entries:  # a part ends at the even size, or where the next entry would cross the cap
            if parts[-1] and (size >= target or size + e.view.batch > per_bucket):
                parts.append([])
                size = 0
            parts[-1].append(e)
            size += e.view.batch
        return [replace(self, entries=part, cache={}) for part in parts]

    @property
    def scratch(self) -> Scratch:
        """The bucket's work buffers, kept as long as the plan and reused every step:
        ``bucket.scratch(name, shape, dtype)``."""
        if "scratch" not in self.cache:
            self.cache["scratch"] = Scratch(self.device)
        return self.cache["scratch"]

    def orthogonalize(self, stack: torch.Tensor, max_workspace_bytes: int | None,
                      consume: bool = False) -> torch.Tensor:
        """One backend call per bucket, or one per chunk when the workspace cap (or the backend's
        per-call limit) splits it. On a CPU the chunks write into a buffer kept per stack shape (a
        whole bucket, or a rank's share of one). ``consume``: the caller gives the stack up, and the
        backend may use its memory (the result may lie in it)."""
        chunks = self.chunks(max_workspace_bytes, stack.shape[0])
        kwargs = ({} if self.path is None else {"path": self.path}) | ({"consume": True} if consume else {})
        if len(chunks) == 1:
            return self.backend.orthogonalize(stack, self.config, self.ns_dtype, **kwargs)
        if stack.device.type == "cpu":
            out = self.scratch(("orthogonalized", tuple(stack.shape)), tuple(stack.shape), self.ns_dtype)
        else:
            out = torch.empty(stack.shape, dtype=self.ns_dtype, device=stack.device)
        for start, stop in chunks:
            out[start:stop] = self.backend.orthogonalize(stack[start:stop], self.config, self.ns_dtype, **kwargs)
        return out
