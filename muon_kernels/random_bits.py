"""The random bits of stochastic rounding, the torch reference: 32 bits per element, a hash of
(entry seed, step, element index) — hash(index ^ hash(seed ^ hash(step))) with lowbias32
(C. Wellons), a bijection of 32-bit values. The Triton and CUDA momentum kernels compute the same
hash in registers (uint32), so every backend draws the same bits; the seed comes from the
parameter's place in the optimizer and the step from its state, so a resumed run draws them again.
"""

from __future__ import annotations

import functools
import sys

import torch

_MASK32 = 0xFFFFFFFF


def entry_seed(group_index: int, param_index: int, part) -> int:
    """A 31-bit seed per (parameter, split piece), stable across processes and resumes: lowbias32 of
    the place, on the host in Python integers (no tensor: a plan built inside ``torch.compile``
    traced a one-element hash, which torch 2.11's Inductor failed to lower, and synced on ``.item()``)."""
    value = (group_index * 1_000_003 + param_index) * 65_537 + (part[1] if part else 0)
    return _host_lowbias32(value & _MASK32) & 0x7FFFFFFF


def _host_lowbias32(x: int) -> int:
    """``_lowbias32`` of one value in [0, 2^32), in Python integers (products kept to 32 bits)."""
    x ^= x >> 16
    x = x * (_M1 & _MASK32) & _MASK32
    x ^= x >> 15
    x = x * (_M2 & _MASK32) & _MASK32
    return x ^ x >> 16


# The kernels hash in uint32. torch has no uint32 arithmetic on every device, so the reference runs
# the same operations in int32, whose products wrap modulo 2^32 to the same bits, with a mask after
# each right shift (torch's int32 shift is arithmetic; the mask makes it logical). int32 rather than
# int64: a CPU multiplies int64 vectors one lane at a time, and the int64 hash was 3/4 of a
# stochastically rounded momentum step there.

_M1, _M2 = 0x7FEB352D, 0x846CA68B - 2**32  # lowbias32's multipliers as int32


def _lowbias32(x: torch.Tensor, shifted: torch.Tensor | None = None) -> torch.Tensor:
    """lowbias32 (C. Wellons), a bijection of 32-bit values, on contiguous int32 ``x`` (overwritten);
    one temporary (``shifted``, x's shape) for the shifted copy: a CPU pays page faults for every
    fresh large buffer, more than the arithmetic costs."""
    shifted = torch.empty_like(x) if shifted is None else shifted
    _xor_high_half(x, shifted)
    x *= _M1
    x ^= _logical_right_shift(x, 15, shifted)
    x *= _M2
    _xor_high_half(x, shifted)
    return x


_LITTLE_ENDIAN = sys.byteorder == "little"


def _xor_high_half(x: torch.Tensor, shifted: torch.Tensor) -> None:
    """``x ^= x >>> 16`` in place: the high 16 bits stay, the low 16 take their xor with them. On a
    little-endian machine (every platform torch ships for) that is one op on each value's two int16
    halves instead of three (a shift, a mask, an xor) and their passes over memory: the whole hash of
    4 × 768×3072 values ran 1.55× faster on the development CPU (bench/README.md, CPU strategy)."""
    if _LITTLE_ENDIAN:
        halves = x.view(-1).view(torch.int16).view(-1, 2)  # [:, 0]: the low 16 bits, [:, 1]: the high
        # a method call, not ``^=`` on a subscript: Python would write the result back through
        # ``__setitem__``, a copy_ of the view onto itself (no kernel, ~3-5 µs of host time)
        halves[:, 0].bitwise_xor_(halves[:, 1])
    else:
        x ^= _logical_right_shift(x, 16, shifted)


def _logical_right_shift(x: torch.Tensor, shift: int, out: torch.Tensor) -> torch.Tensor:
    """``x >>> shift`` of int32 ``x``, into ``out``: torch's int32 shift is arithmetic, so the copies
    of the sign bit are masked off."""
    return torch.bitwise_right_shift(x, shift, out=out).bitwise_and_((1 << (32 - shift)) - 1)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of integer ``x`` as int32 (values ≥ 2^31 become negative: the same bits)."""
    x = x.to(torch.int64) & _MASK32
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _unsigned(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64) & _MASK32


@functools.cache
def device_constants(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A device tensor of per-tensor constants (seeds, shard offsets), made once and kept (a few
    bytes per chunk of a model): the same chunks come back every step, a CUDA-graph capture may not
    copy from the host, and a captured graph keeps reading the tensor, so none is ever evicted."""
    return torch.tensor(values, dtype=dtype, device=device)


def step_keys(seeds, steps) -> torch.Tensor:
    """hash(seed ^ hash(step)) per tensor, int32 (k,), on the steps' device (no host sync)."""
    counters = _as_int32(torch.stack([s.reshape(()) for s in steps]))
    seeds = tuple(((s & _MASK32) ^ 2**31) - 2**31 for s in seeds)  # the low 32 bits, as int32
    return _lowbias32(_lowbias32(counters) ^ device_constants(seeds, torch.int32, counters.device))


def bits32(keys: torch.Tensor, offsets, numel: int, out: torch.Tensor | None = None,
           shifted: torch.Tensor | None = None) -> torch.Tensor:
    """(k, numel) int32: hash(index ^ key) per tensor, the index counted from that tensor's offset;
    ``out``/``shifted``: int32 (k, numel) buffers to use."""
    k = keys.shape[0]
    out = torch.empty((k, numel), dtype=torch.int32, device=keys.device) if out is None else out
    shifted = torch.empty_like(out) if shifted is None else shifted
    keys = keys.unsqueeze(1)
    if max(offsets) + numel > 2**31:  # a tensor of over 2^31 elements: count in int64, keep the low 32 bits
        out.copy_(_as_int32(torch.arange(numel, dtype=torch.int64, device=keys.device)
                            + device_constants(tuple(offsets), torch.int64, keys.device).unsqueeze(1)))
        out ^= keys
        return _lowbias32(out, shifted)
    # One index row, in ``shifted`` (the hash overwrites it), broadcast over the k rows by the op
    # that writes them: without offsets, index ^ key is one pass over the (k, numel) bits instead of
    # a copy of the row into every row and an in-place xor.
    index = torch.arange(numel, dtype=torch.int32, device=keys.device, out=shifted[0])
    if any(offsets):
        torch.add(index, device_constants(tuple(offsets), torch.int32, keys.device).unsqueeze(1), out=out)
        out ^= keys
    else:
        torch.bitwise_xor(index, keys, out=out)
    return _lowbias32(out, shifted)


def random_bits(seed: int, step: torch.Tensor, numel: int, device, offset: int = 0) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) per element: hash(index ^ hash(seed ^ hash(step)))."""
    keys = step_keys([seed], [torch.as_tensor(step, device=device)])
    return _unsigned(bits32(keys, [offset], numel)[0])
