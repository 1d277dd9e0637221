"""Low-precision momentum: bf16 with stochastic rounding, and 8-bit (int8, one fp32 scale per block
of 256 values). The torch reference of both; the Triton and CUDA momentum kernels do the same
arithmetic with the same integer hash, so every backend stores the same bits.

**Stochastic rounding** (``momentum_rounding="stochastic"``): the new momentum is formed in fp32
from the stored one and the gradient at its own precision, then rounded to bf16 up or down with
probability proportional to the distance (add 16 random bits below the bf16 mantissa, truncate),
so the rounding error has mean zero and small updates (1 - μ = 5% of a gradient) are not lost to
round-to-nearest. The random bits are a hash of (entry seed, step, element index): the seed comes
from the parameter's place in the optimizer, the step is ``state["momentum_step"]``, so a resumed
run draws the same bits.

**int8** (``momentum_dtype="int8"``): symmetric absmax quantization per block of 256 consecutive
values of the (contiguous) buffer, ``scale = max|m| / 127``, ``q = round(m / scale)`` (nearest, ties up, or
stochastic), state ``momentum_buffer`` (int8) and ``momentum_scale`` (fp32, one per block):
1 + 4/256 bytes per value, 3.94× less than fp32. Blocks, not rows: a block bounds the error by its
own largest value, so an outlier costs precision in 256 values instead of a row of thousands
(the choice of 8-bit optimizers, Dettmers et al. 2022), and a fixed block fits every matrix view
and one kernel chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROUNDINGS = ("nearest", "stochastic")
INT8 = "int8"
QUANT_BLOCK = 256
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class LowPrecision:
    """How a bucket stores its momentum, beyond a plain dtype (part of the bucket key)."""

    int8: bool = False
    stochastic: bool = False

    @property
    def active(self) -> bool:
        return self.int8 or self.stochastic

    def describe(self) -> str:
        kind = "int8 momentum (blocks of 256)" if self.int8 else "bf16 momentum"
        return f"{kind}, {'stochastic' if self.stochastic else 'nearest'} rounding" if self.active else ""


def check_settings(group: dict) -> None:
    md, rounding = group["momentum_dtype"], group["momentum_rounding"]
    if md is not None and md != INT8 and not (isinstance(md, torch.dtype) and md.is_floating_point):
        raise ValueError(f"momentum_dtype must be None (the parameter's dtype), a floating dtype or 'int8', got {md!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"momentum_rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "stochastic" and md not in (torch.bfloat16, INT8):
        raise ValueError("momentum_rounding='stochastic' rounds into a low-precision momentum: set "
                         f"momentum_dtype=torch.bfloat16 or 'int8' (got {md!r})")
    if md == INT8 and (group["split_sizes"] is not None or group["num_heads"] is not None):
        raise ValueError("momentum_dtype='int8' quantizes blocks of the whole parameter, which split pieces would "
                         "share across buckets: use a bf16 or fp32 momentum for groups with split_sizes/num_heads")


def mode(group: dict) -> LowPrecision:
    return LowPrecision(group["momentum_dtype"] == INT8, group["momentum_rounding"] == "stochastic")


def buffer_dtype(group: dict, param_dtype: torch.dtype) -> torch.dtype:
    md = group["momentum_dtype"]
    return torch.int8 if md == INT8 else (md or param_dtype)


def stack_dtype(group: dict, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the update U is stacked in: the momentum's, or the parameter's for int8 momentum."""
    md = group["momentum_dtype"]
    return param_dtype if md == INT8 else (md or param_dtype)


def blocks(numel: int) -> int:
    return math.ceil(numel / QUANT_BLOCK)


def entry_seed(group_index: int, param_index: int, part) -> int:
    """A 31-bit seed per (parameter, split piece), stable across processes and resumes."""
    value = (group_index * 1_000_003 + param_index) * 65_537 + (part[1] if part else 0)
    return int(hash32(torch.tensor(value & _MASK32)).item()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------ bits


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons) on the low 32 bits of int64 ``x``: a bijection of 32-bit values. int64
    products wrap modulo 2^64, so their low 32 bits are the uint32 products the kernels compute."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def random_bits(seed: int, step: torch.Tensor, numel: int, device, offset: int = 0) -> torch.Tensor:
    """32 random bits (int64 in [0, 2^32)) per element: hash(index ^ hash(seed ^ hash(step)))."""
    key = hash32((hash32(step.to(torch.int64)) ^ seed))
    return hash32(torch.arange(offset, offset + numel, dtype=torch.int64, device=device) ^ key)


def stochastic_bf16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16, rounding up in magnitude with probability (dropped bits) / 2^16. NaN stays NaN."""
    raw = x.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((raw + (bits & 0xFFFF)) & 0xFFFF0000)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def quantize(m: torch.Tensor, bits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 ``m`` → (int8 values, fp32 scale per block of 256); ``bits``: stochastic rounding."""
    n = m.numel()
    padded = torch.nn.functional.pad(m, (0, blocks(n) * QUANT_BLOCK - n)).view(-1, QUANT_BLOCK)
    scale = padded.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (padded / safe.unsqueeze(1)).view(-1)[:n]
    if bits is None:
        y = torch.floor(y + 0.5)  # nearest, ties up: the same two fp32 operations in every backend
    else:
        y = torch.floor(y + (bits >> 8).to(torch.float32) * 2.0**-24)  # up with probability frac(y)
    return y.clamp(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = q.numel()
    padded = torch.nn.functional.pad(q.reshape(-1).to(torch.float32), (0, blocks(n) * QUANT_BLOCK - n))
    return (padded.view(-1, QUANT_BLOCK) * scale.unsqueeze(1)).view(-1)[:n]


def convert(state: dict, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The momentum buffer of ``state`` in ``dtype`` (the group's momentum_dtype changed): int8 is
    dequantized or quantized (nearest) through fp32, its scales dropped or made."""
    buf = state["momentum_buffer"]
    values = dequantize(buf, state.pop("momentum_scale")).view(buf.shape) if buf.dtype == torch.int8 else buf.float()
    if dtype != torch.int8:
        return values.to(dtype)
    q, state["momentum_scale"] = quantize(values.reshape(-1), None)
    return q.view(p.shape)


def state_tensors(bucket, state) -> tuple[list, list, list]:
    """(int8 scales, step counters, seeds) per entry of a low-precision bucket (empty where unused)."""
    low = bucket.low_precision
    scales = [state[e.param]["momentum_scale"] for e in bucket.entries] if low.int8 else []
    steps = [state[e.param]["momentum_step"] for e in bucket.entries] if low.stochastic else []
    return scales, steps, [e.seed for e in bucket.entries]


# ------------------------------------------------------------------------------------ update


def momentum_update(bufs, grads, scales, steps, seeds, *, momentum: float, nesterov: bool, form: str,
                    mode: LowPrecision, outs=None, offsets=None) -> list[torch.Tensor]:
    """The reference low-precision momentum step, tensor by tensor (the torch backend's CPU path and
    the oracle of the kernels): M in fp32 from the stored M and G at its own precision, stored back
    stochastically rounded (bf16) or quantized (int8); returns U (Nesterov from the stored M) in
    fp32, or written into ``outs``. ``steps``: this step's counter per tensor (already advanced);
    ``offsets``: the index of each tensor's first element in its parameter (an FSDP2 shard's rows),
    so a shard draws the bits the whole parameter would."""
    weight = 1.0 - momentum
    results = []
    for i, (buf, g) in enumerate(zip(bufs, grads)):
        g32 = g.to(torch.float32).reshape(-1)
        bits = (random_bits(seeds[i], steps[i], g32.numel(), g32.device, offsets[i] if offsets else 0)
                if mode.stochastic else None)
        old = dequantize(buf, scales[i]) if mode.int8 else buf.to(torch.float32).reshape(-1)
        m = torch.lerp(old, g32, weight) if form == "ema" else momentum * old + g32
        if mode.int8:
            q, scale = quantize(m, bits)
            buf.copy_(q.view(buf.shape))
            scales[i].copy_(scale)
            stored = dequantize(q, scale)
        else:
            rounded = stochastic_bf16(m, bits) if mode.stochastic else m.to(buf.dtype)
            buf.copy_(rounded.view(buf.shape))
            stored = rounded.to(torch.float32)
        if not nesterov:
            u = stored
        elif form == "ema":
            u = torch.lerp(g32, stored, momentum)
        else:
            u = g32 + momentum * stored
        u = u.view(buf.shape)
        if outs is not None:
            outs[i].copy_(u)
            results.append(outs[i])
        else:
            results.append(u)
    return results
