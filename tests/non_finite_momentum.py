"""int8 momentum fed a NaN or an infinity: two steps of one parameter whose first gradient has a
non-finite element in one block. Shared by the torch-backend, interpreter and GPU tests: every
backend must store the torch reference's bits there too (a GPU's ``max.f32`` drops a NaN, so a
kernel's block maximum and clamp would otherwise quantize it to a finite -127·scale)."""

from __future__ import annotations

import torch

import muon_kernels as mk

SHAPE = (2, 512)  # two blocks of 256 per row: four blocks
BAD = (1, 7)  # the element made non-finite: block 0 of row 1


def steps(backend: str, device, value: float, options: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(int8 values, block scales) after each of two steps; ``value`` at ``BAD`` in the first gradient
    (no element changed where ``value`` is None), finite gradients otherwise."""
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.zeros(SHAPE, device=device))
    opt = mk.Muon([p], lr=0.05, backend=backend, ns_dtype=torch.float32, ns_steps=1, momentum_dtype="int8",
                  **options)
    states = []
    for step in range(2):
        grad = torch.randn(SHAPE, generator=g)
        if step == 0 and value is not None:
            grad[BAD] = value
        p.grad = grad.to(device)
        opt.step()
        assert opt._buckets[0].backend.NAME == backend
        st = opt.state[p]
        states.append((st["momentum_buffer"].clone(), st["momentum_scale"].clone()))
    return states


def assert_same_bits(states, reference) -> None:
    """int8 values equal; scales equal, NaN where the reference's is NaN (torch.equal calls NaN unequal)."""
    for (q, scale), (ref_q, ref_scale) in zip(states, reference):
        assert torch.equal(q, ref_q)
        torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0, equal_nan=True)
