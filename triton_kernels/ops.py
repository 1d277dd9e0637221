"""The Triton launchers as torch custom ops, so ``torch.compile`` treats each as one opaque call.

Inside an op the tensors are real (the multi-tensor kernels read their addresses), and each op
declares what it mutates, so a compiled training step orders them correctly. Each op has a fake
(meta) implementation for tracing.
"""

from __future__ import annotations

import torch

from ..ns_config import NSConfig
from .fused_update import fused_apply_update, fused_momentum
from .variant_statistics import blocks, variant_statistics
from .newton_schulz import newton_schulz
from .small_newton_schulz import small_newton_schulz


@torch.library.custom_op("muon_kernels::newton_schulz", mutates_args=())
def newton_schulz_op(stack: torch.Tensor, coefficients: list[float], eps: float, norm_scale: float,
                     norm_offset: float, ns_dtype: torch.dtype, small: bool, normalization: str,
                     algorithm: str, restarts: list[int]) -> torch.Tensor:
    """Newton–Schulz on a (k, m, n) stack; ``coefficients`` is the flattened per-step (a, b, c), the
    rest the fields of an ``NSConfig`` (custom ops take only plain types)."""
    steps = tuple(tuple(coefficients[i : i + 3]) for i in range(0, len(coefficients), 3))
    config = NSConfig(steps, eps, norm_scale, norm_offset, normalization, algorithm, tuple(restarts))
    fn = small_newton_schulz if small else newton_schulz
    return fn(stack, config, ns_dtype)


@newton_schulz_op.register_fake
def _(stack, coefficients, eps, norm_scale, norm_offset, ns_dtype, small, normalization, algorithm, restarts):
    return torch.empty(stack.shape, dtype=ns_dtype, device=stack.device)


@torch.library.custom_op("muon_kernels::fused_momentum", mutates_args=("bufs", "stack", "scales"))
def fused_momentum_op(grads: list[torch.Tensor], bufs: list[torch.Tensor], momenta: torch.Tensor,
                      chunk_tensor: torch.Tensor, chunk_start: torch.Tensor, numels: torch.Tensor, meta: torch.Tensor,
                      stack: torch.Tensor, ema: bool, nesterov: bool, scales: list[torch.Tensor],
                      steps: list[torch.Tensor], seeds: list[int]) -> None:
    """``scales``: int8 momentum's block scales (mutated); ``steps``/``seeds``: stochastic rounding."""
    fused_momentum(grads, bufs, momenta, (chunk_tensor, chunk_start, numels, meta), stack, ema=ema, nesterov=nesterov,
                   scales=scales, steps=steps, seeds=seeds)


@fused_momentum_op.register_fake
def _(grads, bufs, momenta, chunk_tensor, chunk_start, numels, meta, stack, ema, nesterov, scales, steps, seeds):
    return None


@torch.library.custom_op("muon_kernels::fused_apply_update", mutates_args=("params",))
def fused_apply_update_op(params: list[torch.Tensor], alphas: torch.Tensor, decays: torch.Tensor,
                          chunk_tensor: torch.Tensor, chunk_start: torch.Tensor, numels: torch.Tensor,
                          meta: torch.Tensor, ortho: torch.Tensor, cautious: bool, row_scale: torch.Tensor | None = None,
                          gains: torch.Tensor | None = None, shrink: torch.Tensor | None = None) -> None:
    fused_apply_update(params, alphas, decays, (chunk_tensor, chunk_start, numels, meta), ortho, cautious,
                       row_scale, gains, shrink)


@fused_apply_update_op.register_fake
def _(params, alphas, decays, chunk_tensor, chunk_start, numels, meta, ortho, cautious, row_scale=None, gains=None,
      shrink=None):
    return None


@torch.library.custom_op("muon_kernels::variant_statistics", mutates_args=("states", "row_scale"))
def variant_statistics_op(ortho: torch.Tensor, params: list[torch.Tensor], states: list[torch.Tensor],
                          table: torch.Tensor, row_scale: torch.Tensor | None, normuon: bool, hyperball: bool,
                          beta2: float, eps: float) -> torch.Tensor:
    """The statistics pass (triton_kernels/variant_statistics.py). ``params`` and ``states`` (NorMuon's
    v, updated in place) are reached through ``table``; they are arguments so the mutation and the
    reads are declared."""
    return variant_statistics(ortho, table, row_scale, param_dtype=params[0].dtype, normuon=normuon,
                              hyperball=hyperball, beta2=beta2, eps=eps)


@variant_statistics_op.register_fake
def _(ortho, params, states, table, row_scale, normuon, hyperball, beta2, eps):
    return ortho.new_empty((ortho.shape[0], blocks(ortho.shape[2]), 4), dtype=torch.float32)
