"""A stack the caller gives up (``consume=True``: a step's own momentum stack) serves as one of
Newton–Schulz's m×n buffers — X normalized over it where their elements are as wide, else the
products' second buffer in its memory — and the results are the bits of a call that keeps it.
On the interpreter: the real kernels, with their reads and writes of the stack's memory."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import torch_backend
from muon_kernels.ns_config import resolve_ns_config
from muon_kernels.triton_kernels.newton_schulz import (consumed, cublas_newton_schulz, newton_schulz,
                                                        symmetric_cublas_newton_schulz)

CONFIGS = {
    "standard": resolve_ns_config("keller", 5, 1e-7),
    "standard, 4 steps": resolve_ns_config("keller", 4, 1e-7),  # the result in the other buffer
    "gram": resolve_ns_config("keller", 5, 1e-7, "gram", ns_gram_restarts=(2,)),
    "aol": resolve_ns_config("turbo", 4, 1e-7),
}
PATHS = {"symmetric": newton_schulz, "cublas": cublas_newton_schulz, "symmetric-cublas": symmetric_cublas_newton_schulz}
DTYPES = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]


def _stack(dtype, seed=0):
    return torch.randn(2, 24, 40, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("stack_dtype, ns_dtype", DTYPES)
def test_a_consumed_stack_gives_the_same_bits(config, stack_dtype, ns_dtype):
    cfg = CONFIGS[config]
    stack = _stack(stack_dtype)
    kept = newton_schulz(stack.clone(), cfg, ns_dtype)
    mine = stack.clone()
    over, second = consumed(mine, ns_dtype)
    assert (over is None) != (second is None)  # every one of these stacks holds one m×n buffer
    assert torch.equal(newton_schulz(mine, cfg, ns_dtype, consume=True), kept)


@pytest.mark.parametrize("path", ["cublas", "symmetric-cublas"])
@pytest.mark.parametrize("config", ["standard", "gram"])
def test_the_cublas_paths_consume_with_the_same_bits(path, config):
    fn, cfg = PATHS[path], CONFIGS[config]
    stack = _stack(torch.float32, seed=1)
    assert torch.equal(fn(stack.clone(), cfg, torch.bfloat16, consume=True), fn(stack.clone(), cfg, torch.bfloat16))


def test_a_narrower_or_strided_stack_is_not_consumed():
    """A bf16 stack cannot hold an fp32 iteration's m×n buffer, and a transposed view is not one
    block of memory: both run as a kept stack does, and the stack is left as it was."""
    cfg = CONFIGS["standard"]
    for stack, ns_dtype in ((_stack(torch.bfloat16, 2), torch.float32), (_stack(torch.float32, 3).mT, torch.bfloat16)):
        assert consumed(stack, ns_dtype) == (None, None)
        before = stack.clone()
        assert torch.equal(newton_schulz(stack, cfg, ns_dtype, consume=True), newton_schulz(before, cfg, ns_dtype))
        assert torch.equal(stack, before)


def test_a_triton_step_gives_the_torch_backends_bits_with_consumed_stacks():
    """The optimizer hands each local bucket's stack over (``consume=True``); the Triton step's
    parameters stay those of the torch backend's step (fp32 iteration: both reduce alike here)."""
    shapes = [(24, 40), (40, 24), (24, 40)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    params = {b: [torch.nn.Parameter(w.clone()) for w in start] for b in ("triton", "torch")}
    opts = {b: mk.Muon(ps, lr=0.02, backend=b, ns_dtype=torch.float32) for b, ps in params.items()}
    for step in range(2):
        for b, ps in params.items():
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opts[b].step()
    for p, q in zip(params["triton"], params["torch"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stack_dtype, ns_dtype", DTYPES)
def test_the_torch_backend_consumes_with_the_same_bits(stack_dtype, ns_dtype):
    cfg = CONFIGS["standard"]
    stack = _stack(stack_dtype, seed=4)
    kept = torch_backend.orthogonalize(stack.clone(), cfg, ns_dtype)
    assert torch.equal(torch_backend.orthogonalize(stack.clone(), cfg, ns_dtype, consume=True), kept)
