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
values of a row (the buffer seen as (shape[0], rest); a row's last block may be shorter),
``scale = max|m| / 127``, ``q = round(m / scale)`` (nearest, ties up, or stochastic), state
``momentum_buffer`` (int8) and ``momentum_scale`` (fp32, (shape[0], blocks per row)): 1 + 4/256
bytes per value, 3.94× less than fp32. Blocks, not whole rows: a block bounds the error by its own
largest value, so an outlier costs precision in 256 values instead of a row of thousands (the
choice of 8-bit optimizers, Dettmers et al. 2022). Blocks within rows: FSDP2 shards rows, so every
block and its scale stay on one rank (the scales are sharded like the momentum), and split pieces
along the rows keep whole blocks. Where a row is a multiple of 256 long (transformer widths), the
blocks tile the flat buffer and the fused kernels quantize them in registers.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .bucket import LowPrecision

ROUNDINGS = ("nearest", "stochastic")
INT8 = "int8"
QUANT_BLOCK = 256
_MASK32 = 0xFFFFFFFF


def check_settings(group: dict) -> None:
    md, rounding = group["momentum_dtype"], group["momentum_rounding"]
    if md is not None and md != INT8 and not (isinstance(md, torch.dtype) and md.is_floating_point):
        raise ValueError(f"momentum_dtype must be None (the parameter's dtype), a floating dtype or 'int8', got {md!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"momentum_rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "stochastic" and md not in (torch.bfloat16, INT8):
        raise ValueError("momentum_rounding='stochastic' rounds into a low-precision momentum: set "
                         f"momentum_dtype=torch.bfloat16 or 'int8' (got {md!r})")


def mode(group: dict) -> LowPrecision:
    return LowPrecision(group["momentum_dtype"] == INT8, group["momentum_rounding"] == "stochastic")


def buffer_dtype(group: dict, param_dtype: torch.dtype) -> torch.dtype:
    md = group["momentum_dtype"]
    return torch.int8 if md == INT8 else (md or param_dtype)


def stack_dtype(group: dict, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the update U is stacked in: the momentum's, or the parameter's for int8 momentum."""
    md = group["momentum_dtype"]
    return param_dtype if md == INT8 else (md or param_dtype)


def scale_shape(shape) -> tuple[int, int]:
    """int8 block scales of a buffer of ``shape``: (rows, blocks per row), rows = shape[0]."""
    rows = shape[0]
    return rows, math.ceil(math.prod(shape[1:]) / QUANT_BLOCK)


def check_piece(part, name: str) -> None:
    """int8 blocks within rows: a split piece that cuts the columns (a weight stored (in, out)) must
    start and end on block boundaries, or a block would be shared by two pieces."""
    if part is not None and part[0] == 1 and (part[1] % QUANT_BLOCK or part[2] % QUANT_BLOCK):
        raise ValueError(f"parameter {name}: momentum_dtype='int8' quantizes blocks of {QUANT_BLOCK} along each row, "
                         f"but its split piece [{part[1]}, {part[1] + part[2]}) of the columns does not start and end "
                         f"on a multiple of {QUANT_BLOCK}; use a bf16 momentum (with momentum_rounding='stochastic') "
                         "for this group")


def kernel_blocks(bucket) -> bool:
    """Whether the fused kernels can quantize this bucket's int8 momentum: every entry a whole
    parameter or a row piece, with rows a multiple of 256 long, so the blocks tile the flat buffer."""
    return all((e.part is None or e.part[0] == 0) and math.prod(e.target.shape[1:]) % QUANT_BLOCK == 0
               for e in bucket.entries)  # a row's length, also for a shard entry with no rows here


def kernel_bits(bucket) -> bool:
    """Whether the fused kernels draw this bucket's random bits: they hash each element's index in
    its tensor, so an FSDP2 shard's rows, which draw the bits of their place in the whole parameter
    (``Entry.offset``), take the torch path."""
    return not bucket.low_precision.stochastic or not any(e.offset for e in bucket.entries)


def scale_piece(e, scale: torch.Tensor) -> torch.Tensor:
    """An entry's block scales: they lie like the momentum's rows (a row of blocks per row), so a
    row piece or a shard's rows are the entry's rows of them, and a column piece is whole blocks of
    every row."""
    if e.part is not None and e.part[0] == 1:
        return replace(e, part=None).piece(scale).narrow(1, e.part[1] // QUANT_BLOCK, e.part[2] // QUANT_BLOCK)
    return e.piece(scale)


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


def _blocked(x: torch.Tensor) -> torch.Tensor:
    """(rows, cols) → (rows, blocks, 256), the last block of each row zero-padded (a view, no copy,
    where rows are whole blocks and x is contiguous: transformer widths)."""
    rows, cols = x.shape
    blocks = math.ceil(cols / QUANT_BLOCK)
    if cols == blocks * QUANT_BLOCK and x.is_contiguous():
        return x.view(rows, blocks, QUANT_BLOCK)
    return torch.nn.functional.pad(x, (0, blocks * QUANT_BLOCK - cols)).view(rows, blocks, QUANT_BLOCK)


def _unblocked(x: torch.Tensor, cols: int) -> torch.Tensor:
    rows, blocks, _ = x.shape
    return x.reshape(rows, blocks * QUANT_BLOCK)[:, :cols]


def quantize(m: torch.Tensor, bits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``m`` (rows, cols) → (int8 values (rows, cols), fp32 scales (rows, blocks)); ``bits``
    (rows, cols): stochastic rounding."""
    y, scale = _quantized(m, bits)
    return y.to(torch.int8), scale


def _quantized(m: torch.Tensor, bits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize``'s values still in fp32 (integers in [-127, 127], exact in int8), and the scales."""
    rows, cols = m.shape
    blocked = _blocked(m)
    scale = blocked.abs().amax(dim=2) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = _unblocked(blocked / safe.unsqueeze(2), cols)
    if bits is None:
        y = torch.floor(y + 0.5)  # nearest, ties up: the same two fp32 operations in every backend
    else:
        y = torch.floor(y + (bits >> 8).to(torch.float32) * 2.0**-24)  # up with probability frac(y)
    return y.clamp_(-127, 127), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (rows, cols) — or its values in fp32 — and scales (rows, blocks) → fp32 (rows, cols)."""
    return _unblocked(_blocked(q.to(torch.float32)) * scale.unsqueeze(2), q.shape[1])


def convert(state: dict, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The momentum buffer of ``state`` in ``dtype`` (the group's momentum_dtype changed): int8 is
    dequantized or quantized (nearest) through fp32, its scales dropped or made."""
    buf = state["momentum_buffer"]
    rows = buf.shape[0]
    if buf.dtype == torch.int8:
        values = dequantize(buf.reshape(rows, -1), state.pop("momentum_scale")).view(buf.shape)
    else:
        values = buf.float()
    if dtype != torch.int8:
        return values.to(dtype)
    q, state["momentum_scale"] = quantize(values.reshape(rows, -1), None)
    return q.view(p.shape)


def state_tensors(bucket, state) -> tuple[list, list, list]:
    """(int8 scales, step counters, seeds) per entry of a low-precision bucket (empty where unused)."""
    low = bucket.low_precision
    scales = [scale_piece(e, state[e.param]["momentum_scale"]) for e in bucket.entries] if low.int8 else []
    steps = [state[e.param]["momentum_step"] for e in bucket.entries] if low.stochastic else []
    return scales, steps, [e.seed for e in bucket.entries]


def new_scales(p: torch.Tensor) -> torch.Tensor:
    """Zero block scales for ``p``'s int8 momentum; for an FSDP2 shard a DTensor sharded like ``p``
    (its rows), so checkpoints gather and reshard it with the momentum."""
    rows, blocks = scale_shape(p.shape)
    if not hasattr(p, "device_mesh"):
        return torch.zeros((rows, blocks), dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import DTensor

    local = p.to_local()
    zeros = torch.zeros((local.shape[0], blocks), dtype=torch.float32, device=local.device)
    return DTensor.from_local(zeros, p.device_mesh, p.placements, shape=(rows, blocks), stride=(blocks, 1))


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
        rows, cols = buf.shape[0], math.prod(buf.shape[1:])  # rows: the int8 blocks run along them
        g32 = g.to(torch.float32).reshape(rows, cols)
        bits = (random_bits(seeds[i], steps[i], g32.numel(), g32.device, offsets[i] if offsets else 0).view(g32.shape)
                if mode.stochastic else None)
        old = dequantize(buf.reshape(rows, cols), scales[i]) if mode.int8 else buf.to(torch.float32).reshape(rows, cols)
        m = torch.lerp(old, g32, weight) if form == "ema" else momentum * old + g32
        if mode.int8:
            y, scale = _quantized(m, bits)
            buf.copy_(y.view(buf.shape))  # the cast to int8 is exact
            scales[i].copy_(scale)
            stored = dequantize(y, scale)  # y is the int8 values in fp32: no second cast
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
