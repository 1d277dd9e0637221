"""The momentum's random bits picked on purpose: the hash (lowbias32, DESIGN.md's stochastic
rounding: bits = hash(index ^ hash(seed ^ hash(step)))) in Python integers and in int64 tensors
(the definitions the package's int32 hash must match), and its inverse, which
gives the seed under which a chosen element draws chosen bits at a chosen step. Random tests almost
never reach the extreme draws (1 in 2^18 for a fraction that rounds 127 up to 128); these reach them
every time."""

from __future__ import annotations

import torch

import muon_kernels as mk
from muon_kernels import random_bits

_MASK = 0xFFFFFFFF
_A, _B = 0x7FEB352D, 0x846CA68B


def lowbias32(x: int) -> int:
    x &= _MASK
    x ^= x >> 16
    x = (x * _A) & _MASK
    x ^= x >> 15
    x = (x * _B) & _MASK
    return x ^ (x >> 16)


def lowbias32_tensor(x: torch.Tensor) -> torch.Tensor:
    """uint32 lowbias32 in int64 arithmetic (products wrap modulo 2^64; their low 32 bits are the
    uint32 products), the definition the package's int32 version must match."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * _A) & _MASK
    x = x ^ (x >> 15)
    x = (x * _B) & _MASK
    return x ^ (x >> 16)


def bits(seed: int, step: int, numel: int, offset: int) -> torch.Tensor:
    """The 32 random bits (int64) of elements [offset, offset + numel) at (seed, step), by the definition."""
    key = lowbias32_tensor(lowbias32_tensor(torch.tensor(step)) ^ seed)
    return lowbias32_tensor(torch.arange(offset, offset + numel) ^ key)


def lowbias32_inverse(y: int) -> int:
    """Each step undone in reverse order: a shift-xor by 16 is its own inverse on 32 bits, one by 15
    is undone by xoring the shifts by 15 and 30, the odd multipliers by their inverses mod 2^32."""
    y &= _MASK
    y ^= y >> 16
    y = (y * pow(_B, -1, 2**32)) & _MASK
    y ^= (y >> 15) ^ (y >> 30)
    y = (y * pow(_A, -1, 2**32)) & _MASK
    return y ^ (y >> 16)


def seed_drawing(bits: int, index: int, step: int) -> int:
    """A seed (31 bits, as the package's entry seeds) under which element ``index`` draws ``bits``
    (any 32-bit value agreeing with ``bits`` in the 24 high bits that int8 rounding reads) at ``step``."""
    for low in range(256):
        key = lowbias32_inverse((bits & 0xFFFFFF00) | low) ^ index
        seed = lowbias32_inverse(key) ^ lowbias32(step)
        if seed < 2**31:
            return seed
    raise AssertionError("no 31-bit seed draws those bits")


def int8_at_the_top(backend: str, device, monkeypatch) -> tuple[torch.nn.Parameter, mk.Muon, int, int]:
    """One step of stochastic int8 momentum where every element sits at its block's maximum, exactly
    127 levels (gradient 127/128: scale 1/128), and element ``index`` draws the largest fraction,
    1 - 2^-24: 127 + that rounds to 128 in fp32, which int8 cannot hold. Returns the parameter, the
    optimizer, the seed and the index."""
    index = 300  # in the second block of the first row
    seed = seed_drawing(_MASK, index, step=1)
    monkeypatch.setattr(random_bits, "entry_seed", lambda *args: seed)
    p = torch.nn.Parameter(torch.zeros(2, 512, device=device))
    opt = mk.Muon([p], lr=0.01, backend=backend, ns_dtype=torch.float32, ns_steps=1, momentum_form="sgd",
                  momentum_dtype="int8", momentum_rounding="stochastic")
    p.grad = torch.full_like(p, 127 / 128)
    opt.step()
    return p, opt, seed, index
