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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_step_with_consumed_stacks_takes_the_same_steps(monkeypatch, backend):
    """The optimizer hands each local bucket's stack over (``consume=True``); three steps give the
    parameters of the same steps with every stack kept (Bucket.orthogonalize forced to keep them).
    The Triton one-kernel path, which has no m×n buffer to lend, is switched off so the symmetric
    kernels run and really consume (counted)."""
    import muon_kernels.triton_kernels.newton_schulz as triton_ns
    from muon_kernels.backends import triton_backend
    from muon_kernels.bucket import Bucket

    monkeypatch.setattr(triton_backend, "small_path", lambda *args: False)
    calls = []
    real_consumed = triton_ns.consumed
    monkeypatch.setattr(triton_ns, "consumed", lambda *a: calls.append(a[0].shape) or real_consumed(*a))
    shapes = [(24, 40), (40, 24), (24, 40), (16, 16)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    keep = Bucket.orthogonalize

    def run(consume: bool):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = mk.Muon(params, lr=0.02, backend=backend)
        with monkeypatch.context() as m:
            if not consume:
                m.setattr(Bucket, "orthogonalize", lambda self, stack, cap, consume=False: keep(self, stack, cap))
            for step in range(3):
                g = torch.Generator().manual_seed(10 + step)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
        return params

    kept = run(False)
    assert not calls
    consumed = run(True)
    assert len(calls) == (6 if backend == "triton" else 0)  # two buckets, three steps
    assert all(torch.equal(p, q) for p, q in zip(consumed, kept))


@pytest.mark.parametrize("stack_dtype, ns_dtype", DTYPES)
def test_the_torch_backend_consumes_with_the_same_bits(stack_dtype, ns_dtype):
    cfg = CONFIGS["standard"]
    stack = _stack(stack_dtype, seed=4)
    kept = torch_backend.orthogonalize(stack.clone(), cfg, ns_dtype)
    assert torch.equal(torch_backend.orthogonalize(stack.clone(), cfg, ns_dtype, consume=True), kept)
