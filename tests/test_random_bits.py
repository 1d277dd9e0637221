"""The random bits of stochastic rounding (muon_kernels/random_bits.py): a fixed function of (seed,
step, index), equal to lowbias32's uint32 definition written here (not from the package's code) for
every input, byte order, seed size and shard offset."""

from __future__ import annotations

import pytest
import torch

from muon_kernels import random_bits as rb
import stochastic_draws
from stochastic_draws import bits, lowbias32_tensor


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The package's int32 lowbias32 on the low 32 bits of integer ``x``, read back as int64 in [0, 2^32)."""
    return rb._unsigned(rb._lowbias32(rb._as_int32(x)))


def test_random_bits_are_a_fixed_function_of_seed_step_and_index():
    a = rb.random_bits(5, torch.tensor(2), 1000, "cpu")
    assert torch.equal(a, rb.random_bits(5, torch.tensor(2), 1000, "cpu"))
    assert not torch.equal(a, rb.random_bits(5, torch.tensor(3), 1000, "cpu"))
    assert not torch.equal(a, rb.random_bits(6, torch.tensor(2), 1000, "cpu"))
    assert torch.equal(a[500:], rb.random_bits(5, torch.tensor(2), 500, "cpu", offset=500))  # a shard's bits
    assert a.unique().numel() == 1000 and int(a.min()) >= 0 and int(a.max()) < 2**32
    # lowbias32 on known inputs (uint32 arithmetic in Python integers: tests/stochastic_draws.py)
    xs = [0, 1, 2**31, 2**32 - 1, 123456789]
    assert hash32(torch.tensor(xs)).tolist() == [stochastic_draws.lowbias32(x) for x in xs]


@pytest.mark.parametrize("little_endian", [True, False])
def test_int32_hash_is_the_uint32_hash_everywhere(monkeypatch, little_endian):
    """Random and extreme 32-bit inputs, steps and offsets past 2^31 (int32 wrap-around); both ways of
    xoring the high half into the low one (int16 halves; shift and mask where big-endian)."""
    monkeypatch.setattr(rb, "_LITTLE_ENDIAN", little_endian)
    assert hash32(torch.tensor(2**31 + 7)).item() == lowbias32_tensor(torch.tensor(2**31 + 7)).item()  # 0-d
    g = torch.Generator().manual_seed(3)
    xs = torch.cat([torch.randint(0, 2**32, (100_000,), generator=g, dtype=torch.int64),
                    torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xFFFF, 0x10000, 2**40 + 5])])
    assert torch.equal(hash32(xs), lowbias32_tensor(xs))
    for seed, step, offset in [(0, 0, 0), (2**31 - 1, 2**33 + 7, 2**31 - 100), (12345, 2**31, 3)]:
        assert torch.equal(rb.random_bits(seed, torch.tensor(step), 1000, "cpu", offset=offset),
                           bits(seed, step, 1000, offset))


def test_seeds_of_any_size_hash_their_low_32_bits():
    step = torch.tensor(5)
    assert torch.equal(rb.random_bits(2**33 + 9, step, 64, "cpu"), rb.random_bits(9, step, 64, "cpu"))
    assert torch.equal(rb.random_bits(-1, step, 64, "cpu"), rb.random_bits(2**32 - 1, step, 64, "cpu"))
    assert torch.equal(rb.random_bits(2**31 + 3, step, 64, "cpu"), bits(2**31 + 3, 5, 64, 0))


def test_entry_seeds_are_the_hash_of_the_place_computed_without_a_tensor():
    """A seed is lowbias32 of (group, parameter, piece) by the definition, the 31 low bits kept — the
    same seeds as ever, so resumed runs draw the same bits — and it is made on the host without a
    single tensor operation: a plan built inside torch.compile traced the one-element hash, which
    torch 2.11's Inductor could not lower (a view of the int32 value as int16 halves)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    places = [(0, 0, None), (1, 7, None), (3, 2, (0, 128, 64)), (5000, 70_000, (1, 2**20, 256)), (2**20, 3, None)]
    with Ops() as ops:
        seeds = [rb.entry_seed(*place) for place in places]
    assert ops.seen == []
    for (group, index, part), seed in zip(places, seeds):
        value = (group * 1_000_003 + index) * 65_537 + (part[1] if part else 0)
        assert seed == stochastic_draws.lowbias32(value) & 0x7FFFFFFF
    assert len(set(seeds)) == len(seeds)
