"""The Triton launchers as torch custom ops, so ``torch.compile`` treats each as one opaque call.

Inside an op the tensors are real (the multi-tensor kernels read their addresses), and each op
declares what it mutates, so a compiled training step orders them correctly. Each op has a fake
(meta) implementation for tracing.

The backends call the ops through ``eager_or_traced``: in plain eager execution the op's Python body
runs directly, because the custom-op dispatcher (autograd and ADInplaceOrView keys, default
filling, dynamo's disable wrapper) costs ~50 µs of host time per call on a CPU core — half a
millisecond of a GPT-2-small step's 9 calls, in a step whose small NS products run for tens of
µs each. Under torch.compile or any dispatch mode (fake tensors, export, a launch counter) the op
itself is called, so tracing sees one opaque call with its declared mutations.
"""

from __future__ import annotations

import functools

import torch

from ..ns_config import NSConfig
from ..workspace import on_device
from . import replay
from .fused_update import fused_apply_update, fused_momentum
from .variant_statistics import blocks, variant_factors, variant_statistics
from .newton_schulz import cublas_newton_schulz, newton_schulz, symmetric_cublas_newton_schulz
from .small_newton_schulz import small_newton_schulz

# Newton–Schulz by kernel path (the Triton backend's ``paths``): all steps in one kernel per
# matrix, the symmetric kernels, the normalization kernels with cuBLAS products, or the symmetric
# kernels for X·Xᵀ and b·A + c·A·A with cuBLAS for a·X + B·X.
_NEWTON_SCHULZ = {"small": small_newton_schulz, "symmetric": newton_schulz, "cublas": cublas_newton_schulz,
                  "symmetric-cublas": symmetric_cublas_newton_schulz}


def _traced() -> bool:
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _needs_autograd(args) -> bool:
    """Whether an argument asks for gradients while grad mode is on: the op then runs, so a
    backward through it raises (the ops have no derivative) instead of passing silently."""
    if not torch.is_grad_enabled():
        return False
    tensors = (t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)))
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def eager_or_traced(op, mutated: tuple[int, ...] = ()):
    """``op`` when traced (or when autograd would see it), else its body; ``mutated``: positions of
    the arguments (a tensor or a list of tensors) the body writes, whose autograd version counters
    are bumped as the op would, so autograd still refuses a backward through a tensor the step
    changed."""
    body = getattr(op, "_init_fn", None)  # CustomOpDef's Python function (torch 2.4+); else always the op

    def call(*args):
        if body is None or _traced() or _needs_autograd(args):
            return op(*args)
        out = body(*args)
        for i in mutated:
            written = args[i]
            for t in (written if isinstance(written, (list, tuple)) else (written,)):
                if t is not None:
                    torch.autograd.graph.increment_version(t)
        return out

    call.__name__ = call.__qualname__ = op._name.split("::")[-1]
    call.__doc__ = op.__doc__
    return call


# The same with ``consume=True``: the stack's memory among the call's buffers (one object per path,
# so replay's signatures stay the same from call to call). The one-kernel path needs no m×n buffer.
_CONSUMING = {path: fn if path == "small" else functools.partial(fn, consume=True)
              for path, fn in _NEWTON_SCHULZ.items()}


def _newton_schulz(stack: torch.Tensor, coefficients: list[float], eps: float, norm_scale: float,
                   norm_offset: float, ns_dtype: torch.dtype, path: str, normalization: str, algorithm: str,
                   restarts: list[int], consume: bool = False) -> torch.Tensor:
    steps = tuple(tuple(coefficients[i : i + 3]) for i in range(0, len(coefficients), 3))
    config = NSConfig(steps, eps, norm_scale, norm_offset, normalization, algorithm, tuple(restarts))
    # Recorded once per signature, then replayed with fresh buffers (triton_kernels/replay.py).
    with on_device(stack.device):
        return replay.call((_CONSUMING if consume else _NEWTON_SCHULZ)[path], stack, config, ns_dtype)


@torch.library.custom_op("muon_kernels::newton_schulz", mutates_args=())
def newton_schulz_op(stack: torch.Tensor, coefficients: list[float], eps: float, norm_scale: float,
                     norm_offset: float, ns_dtype: torch.dtype, path: str, normalization: str,
                     algorithm: str, restarts: list[int]) -> torch.Tensor:
    """Newton–Schulz on a (k, m, n) stack along kernel ``path`` ("small", "symmetric", "cublas",
    "symmetric-cublas");
    ``coefficients`` is the flattened per-step (a, b, c), the rest the fields of an ``NSConfig``
    (custom ops take only plain types)."""
    return _newton_schulz(stack, coefficients, eps, norm_scale, norm_offset, ns_dtype, path, normalization,
                          algorithm, restarts)


@newton_schulz_op.register_fake
def _(stack, coefficients, eps, norm_scale, norm_offset, ns_dtype, path, normalization, algorithm, restarts):
    return torch.empty(stack.shape, dtype=ns_dtype, device=stack.device)


@torch.library.custom_op("muon_kernels::fused_momentum", mutates_args=("bufs", "stack", "scales"))
def fused_momentum_op(grads: list[torch.Tensor], bufs: list[torch.Tensor], momenta: torch.Tensor,
                      chunk_tensor: torch.Tensor, chunk_start: torch.Tensor, numels: torch.Tensor, meta: torch.Tensor,
                      vectorizable: bool, stack: torch.Tensor, ema: bool, nesterov: bool, scales: list[torch.Tensor],
                      steps: list[torch.Tensor], seeds: list[int]) -> None:
    """``scales``: int8 momentum's block scales (mutated); ``steps``/``seeds``: stochastic rounding.
    ``chunk_tensor`` … ``vectorizable``: the bucket's ``fused_update.Layout``."""
    with on_device(stack.device):
        fused_momentum(grads, bufs, momenta, (chunk_tensor, chunk_start, numels, meta, vectorizable), stack, ema=ema,
                       nesterov=nesterov, scales=scales, steps=steps, seeds=seeds)


@fused_momentum_op.register_fake
def _(grads, bufs, momenta, chunk_tensor, chunk_start, numels, meta, vectorizable, stack, ema, nesterov, scales, steps,
      seeds):
    return None


@torch.library.custom_op("muon_kernels::fused_apply_update", mutates_args=("params",))
def fused_apply_update_op(params: list[torch.Tensor], alphas: torch.Tensor, decays: torch.Tensor,
                          chunk_tensor: torch.Tensor, chunk_start: torch.Tensor, numels: torch.Tensor,
                          meta: torch.Tensor, vectorizable: bool, ortho: torch.Tensor, cautious: bool,
                          row_scale: torch.Tensor | None = None, gains: torch.Tensor | None = None,
                          shrink: torch.Tensor | None = None) -> None:
    with on_device(ortho.device):
        fused_apply_update(params, alphas, decays, (chunk_tensor, chunk_start, numels, meta, vectorizable), ortho,
                           cautious, row_scale, gains, shrink)


@fused_apply_update_op.register_fake
def _(params, alphas, decays, chunk_tensor, chunk_start, numels, meta, vectorizable, ortho, cautious, row_scale=None,
      gains=None, shrink=None):
    return None


@torch.library.custom_op("muon_kernels::variant_statistics", mutates_args=("states", "row_scale"))
def variant_statistics_op(ortho: torch.Tensor, params: list[torch.Tensor], states: list[torch.Tensor],
                          table: torch.Tensor, row_scale: torch.Tensor | None, normuon: bool, hyperball: bool,
                          beta2: float, eps: float) -> torch.Tensor:
    """The statistics pass (triton_kernels/variant_statistics.py). ``params`` and ``states`` (NorMuon's
    v, updated in place) are reached through ``table``; they are arguments so the mutation and the
    reads are declared."""
    with on_device(ortho.device):
        return variant_statistics(ortho, table, row_scale, param_dtype=params[0].dtype, normuon=normuon,
                                  hyperball=hyperball, beta2=beta2, eps=eps)


@variant_statistics_op.register_fake
def _(ortho, params, states, table, row_scale, normuon, hyperball, beta2, eps):
    return ortho.new_empty((ortho.shape[0], blocks(ortho.shape[2]), 4), dtype=torch.float32)


@torch.library.custom_op("muon_kernels::variant_factors", mutates_args=())
def variant_factors_op(partials: torch.Tensor, alphas: torch.Tensor | None, radius: torch.Tensor | None,
                       normuon: bool, hyperball: bool, normuon_eps: float,
                       hyperball_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, c) per matrix from the statistics pass's partial sums; c is empty without the hyperball."""
    with on_device(partials.device):
        gains, shrink = variant_factors(partials, alphas, radius, normuon=normuon, hyperball=hyperball,
                                        normuon_eps=normuon_eps, hyperball_eps=hyperball_eps)
    return gains, shrink if shrink is not None else gains.new_empty(0)


@variant_factors_op.register_fake
def _(partials, alphas, radius, normuon, hyperball, normuon_eps, hyperball_eps):
    k = partials.shape[0]
    return partials.new_empty((k,)), partials.new_empty((k if hyperball else 0,))


# What the backends call (positional arguments; ``mutated`` mirrors each op's ``mutates_args``).
_newton_schulz_launch = eager_or_traced(newton_schulz_op)
fused_momentum_launch = eager_or_traced(fused_momentum_op, mutated=(1, 8, 11))
fused_apply_update_launch = eager_or_traced(fused_apply_update_op, mutated=(0,))
variant_statistics_launch = eager_or_traced(variant_statistics_op, mutated=(2, 4))
variant_factors_launch = eager_or_traced(variant_factors_op)


def newton_schulz_launch(*args, consume: bool = False) -> torch.Tensor:
    """``newton_schulz_op``'s arguments; with ``consume`` (the caller gives the stack up) its memory is
    among the call's buffers (newton_schulz.consumed) wherever the op's body runs directly. A custom
    op may not return memory of its input, so a traced call (or one autograd would see) takes the
    op, without consuming."""
    if consume and not _traced() and not _needs_autograd(args):
        torch.autograd.graph.increment_version(args[0])  # its memory is overwritten
        return _newton_schulz(*args, consume=True)
    return _newton_schulz_launch(*args)
