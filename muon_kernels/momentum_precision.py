"""Low-precision momentum: bf16 with stochastic rounding, and 8-bit (int8, one fp32 scale per block
of 256 values). The torch reference of both; the Triton and CUDA momentum kernels do the same
arithmetic with the same integer hash, so every backend stores the same bits. Also each parameter's
momentum state itself: the buffer in its group's dtype (``momentum_buffer``) and the stochastic
rounding's step counters (``advance_steps``).

**Stochastic rounding** (``momentum_rounding="stochastic"``): the new momentum is formed in fp32
from the stored one and the gradient at its own precision, then rounded to bf16 up or down with
probability proportional to the distance (add 16 random bits below the bf16 mantissa, truncate),
so the rounding error has mean zero and small updates (1 - μ = 5% of a gradient) are not lost to
round-to-nearest. The random bits (``random_bits``) are a hash of (entry seed, step, element
index): the seed comes from the parameter's place in the optimizer, the step is
``state["momentum_step"]``, so a resumed run draws the same bits.

**int8** (``momentum_dtype="int8"``): symmetric absmax quantization per block of 256 consecutive
values of a row (the buffer seen as (shape[0], rest); a row's last block may be shorter),
``scale = max|m| / 127`` (as ``max|m| · fl32(1/127)``: ``INV_127``), ``q = round(m / scale)``
(nearest, ties up, or stochastic), state
``momentum_buffer`` (int8) and ``momentum_scale`` (fp32, (shape[0], blocks per row)): 1 + 4/256
bytes per value, 3.94× less than fp32. Blocks, not whole rows: a block bounds the error by its own
largest value, so an outlier costs precision in 256 values instead of a row of thousands (the
choice of 8-bit optimizers, Dettmers et al. 2022). Blocks within rows: FSDP2 shards rows, so every
block and its scale stay on one rank (the scales are sharded like the momentum), and split pieces
along the rows keep whole blocks. Where a row is a multiple of 256 long (transformer widths), the
blocks tile the flat buffer and the fused kernels quantize them in registers. A block that holds a
NaN or an infinity keeps it: its scale is NaN (or inf), so each of its values dequantizes to NaN and
the next steps stay non-finite, as an fp32 momentum would (a NaN is never quantized to a finite
-127·scale); its int8 values are the usual rounding of m / scale (0 for a scale of inf; a NaN scale
counts as 1, like a zero one) with a NaN stored as 0. Every backend stores those bits.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import random_bits
from .bucket import LowPrecision
from .workspace import Scratch

ROUNDINGS = ("nearest", "stochastic")
INT8 = "int8"
QUANT_BLOCK = 256
# An int8 block's scale is max|m| times fl32(1/127), not max|m| / 127: a GPU's torch divides by a
# Python number as a multiplication by its reciprocal (ATen's CUDA division, "may lose one bit":
# ~4% of scales differ by an ulp) while a CPU divides, and a product is rounded alike everywhere —
# CPU, CUDA, Inductor and the kernels, which multiply by this same constant (0x1.020408p-7).
INV_127 = 0.0078740157186985015869140625


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


# ------------------------------------------------------------------------------------ rounding


def stochastic_bf16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16, rounding up in magnitude with probability (dropped bits) / 2^16. NaN stays NaN."""
    return _stochastic_bf16_(x.clone(), (bits & 0xFFFF).to(torch.int32)).to(torch.bfloat16)


def _stochastic_bf16_(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``stochastic_bf16``'s values, still fp32 (each exactly a bf16), in ``x``'s place; int32 ``bits``
    is overwritten. In int32: adding at most 2^16 - 1 to a finite float's bits never overflows (only
    NaN patterns lie near the int32 limits, and NaN is restored)."""
    rounded = bits.bitwise_and_(0xFFFF).add_(x.view(torch.int32)).bitwise_and_(-65536).view(torch.float32)  # 0xFFFF0000
    return torch.where(torch.isnan(x), x, rounded, out=x)


def _parts(x: torch.Tensor) -> list[tuple[torch.Tensor, slice]]:
    """Views of contiguous ``x`` (rows, cols) as blocks: (rows, n, 256) for the whole blocks of each
    row, then (rows, 1, rest) for a shorter last block; each with its columns of the scales. No
    padding copy: a row shorter than a block (GPT-2 ÷8's 96) is one block of its own length."""
    rows, cols = x.shape
    whole = cols // QUANT_BLOCK
    parts = [(x[:, :whole * QUANT_BLOCK].unflatten(1, (whole, QUANT_BLOCK)), slice(0, whole))] if whole else []
    if cols % QUANT_BLOCK:
        parts.append((x[:, whole * QUANT_BLOCK:].unsqueeze(1), slice(whole, whole + 1)))
    return parts


def quantize(m: torch.Tensor, bits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``m`` (rows, cols) → (int8 values (rows, cols), fp32 scales (rows, blocks)); ``bits``
    (rows, cols): stochastic rounding."""
    y, scale = _quantize_(m.contiguous().clone(), None if bits is None else bits.clone())
    return y.to(torch.int8), scale


def _quantize_(m: torch.Tensor, bits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize``'s values, in place of contiguous ``m`` (integers in [-127, 127] in fp32, exact
    in int8), and the scales; ``bits`` is overwritten."""
    parts = _parts(m)
    scale = torch.empty(scale_shape(m.shape), dtype=torch.float32, device=m.device)
    for v, cols in parts:  # max |m| per block without an |m| temporary (negation is exact)
        torch.maximum(v.amax(dim=2), v.amin(dim=2).neg_(), out=scale[:, cols])
    scale.mul_(INV_127)
    safe = torch.where(scale > 0, scale, 1.0)
    for v, cols in parts:
        v.div_(safe[:, cols].unsqueeze(2))
    if bits is None:
        m.add_(0.5)  # nearest, ties up (then floor): the same two fp32 operations in every backend
    else:  # up with probability frac(y): 24 random bits as a fraction (the scaling by 2^-24 is exact)
        m.add_(bits.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF), alpha=2.0**-24)
    return m.floor_().clamp_(-127, 127), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (rows, cols) — or its values in fp32 — and scales (rows, blocks) → fp32 (rows, cols), a new
    tensor."""
    return _dequantize_into(torch.empty(q.shape, dtype=torch.float32, device=q.device), q, scale)


def _dequantize_into(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dequantize`` written into contiguous fp32 ``out``. On a GPU int8 times fp32 converts and
    multiplies in one pass; a CPU's mixed-dtype product takes a slow path, so there the values are
    converted first and multiplied in place (the conversion is exact: the same values; bench/README.md,
    CPU strategy)."""
    if out.device.type == "cpu":
        return _dequantize_(out.copy_(q), scale)
    q = q.contiguous()
    for (v, cols), (o, _) in zip(_parts(q), _parts(out)):
        torch.mul(v, scale[:, cols].unsqueeze(2), out=o)
    return out


def _dequantize_(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dequantize`` of contiguous fp32 values ``y``, in place."""
    for v, cols in _parts(y):
        v.mul_(scale[:, cols].unsqueeze(2))
    return y


def momentum_buffer(state: dict, p: torch.Tensor, group: dict) -> torch.Tensor:
    """``state[p]``'s momentum buffer in the group's momentum dtype (int8 with its block scales),
    created at the parameter's first step or converted when the group's momentum_dtype changed."""
    st = state[p]
    dtype = buffer_dtype(group, p.dtype)
    # Each state change is made whole or not at all: every tensor is allocated before the state
    # changes, so an allocation that fails (an OOM on the first step, caught and retried) leaves it
    # as it was, never a buffer without its scales.
    if "momentum_buffer" not in st:
        int8 = dtype == torch.int8
        layout = torch.contiguous_format if int8 else torch.preserve_format  # int8 blocks: runs of a contiguous row
        made = {"momentum_buffer": torch.zeros_like(p, dtype=dtype, memory_format=layout)}
        if int8:
            made["momentum_scale"] = new_scales(p)
        st.update(made)
    elif st["momentum_buffer"].dtype != dtype:
        convert(st, p, dtype)
    return st["momentum_buffer"]


def advance_steps(buckets, state: dict) -> None:
    """Stochastic rounding draws from (seed, step): one increment per parameter per step, on the
    parameter's device (no host round trip; a CUDA graph replays it)."""
    steps = {}
    for b in buckets:
        if b.low_precision.stochastic:
            for e in b.entries:
                st = state[e.param]
                if "momentum_step" not in st:
                    st["momentum_step"] = torch.zeros((), dtype=torch.int64, device=e.param.device)
                steps[id(e.param)] = st["momentum_step"]
    if steps:
        torch._foreach_add_(list(steps.values()), 1)


def convert(state: dict, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``state``'s momentum buffer converted to ``dtype`` in place of the old one (the group's
    momentum_dtype changed), and returned: int8 is dequantized or quantized (nearest) through fp32,
    its scales dropped or made. The state changes only once the new tensors exist. An FSDP2 shard
    (DTensor) converts this rank's rows and keeps its sharding, scales sharded like the momentum."""
    buf, scale = state["momentum_buffer"], state.get("momentum_scale")
    if not hasattr(buf, "device_mesh"):
        new, new_scale = _convert(buf, scale, dtype)
    else:
        from torch.distributed.tensor import DTensor

        new, new_scale = _convert(buf.to_local(), None if scale is None else scale.to_local(), dtype)
        new = DTensor.from_local(new, buf.device_mesh, buf.placements, shape=buf.shape,
                                 stride=_contiguous_strides(buf.shape))
        if new_scale is not None:
            rows, blocks = scale_shape(buf.shape)
            new_scale = DTensor.from_local(new_scale, buf.device_mesh, buf.placements, shape=(rows, blocks),
                                           stride=(blocks, 1))
    state["momentum_buffer"] = new
    if new_scale is not None:
        state["momentum_scale"] = new_scale
    else:
        state.pop("momentum_scale", None)
    return new


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _convert(buf: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype):
    """(buffer in ``dtype``, its int8 scales or None) for a plain tensor."""
    # Explicit columns: an FSDP2 rank's shard of a matrix with fewer rows than ranks has none.
    rows, cols = buf.shape[0], math.prod(buf.shape[1:])
    values = dequantize(buf.reshape(rows, cols), scale).view(buf.shape) if buf.dtype == torch.int8 else buf
    if dtype != torch.int8:
        return values.to(dtype), None
    q, new_scale = quantize(values.float().reshape(rows, cols), None)
    return q.view(buf.shape), new_scale


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


# Tensors of one shape whose momentum steps run together (one op sequence per chunk, not per tensor:
# a GPU pays a launch per op, a CPU ~5-10 µs of dispatch), up to CHUNK_ELEMENTS per chunk: a chunk's
# temporaries take ~18 bytes per element (fp32 gradients, M and bits, their scratch), so 2^24
# elements cost ~300 MB at most, one LLaMA-1B MLP matrix. On a CPU only tensors below
# CPU_ALONE_ELEMENTS are stacked, into chunks of at most CPU_CHUNK_ELEMENTS (the bucket keeps their
# temporaries): above that the stacking copy, a pass more over memory, costs more than the per-op
# overhead it saves.
CHUNK_ELEMENTS = 2**24
CPU_ALONE_ELEMENTS = 2**16
CPU_CHUNK_ELEMENTS = 2**20


def _chunks(bufs, grads) -> list[list[int]]:
    """Indices of the tensors stepped together: ``stacked_chunks``, except that on a CPU a tensor of
    CPU_ALONE_ELEMENTS or more goes alone."""
    if not bufs or bufs[0].device.type != "cpu":
        return stacked_chunks(bufs, grads)
    alone = [i for i, b in enumerate(bufs) if b.numel() >= CPU_ALONE_ELEMENTS]
    small = [i for i, b in enumerate(bufs) if b.numel() < CPU_ALONE_ELEMENTS]
    chunks = [[i] for i in alone]
    if small:
        chunks += [[small[j] for j in c]
                   for c in stacked_chunks([bufs[i] for i in small], [grads[i] for i in small], CPU_CHUNK_ELEMENTS)]
    return chunks


def stacked_chunks(bufs, grads, limit: int | None = None) -> list[list[int]]:
    """The tensors of one shape and dtypes together, up to ``limit`` (CHUNK_ELEMENTS) per chunk."""
    limit = limit or CHUNK_ELEMENTS
    groups: dict[tuple, list[list[int]]] = {}
    for i, (b, g) in enumerate(zip(bufs, grads)):
        chunks = groups.setdefault((tuple(b.shape), b.dtype, g.dtype), [[]])
        if chunks[-1] and (len(chunks[-1]) + 1) * b.numel() > limit:
            chunks.append([])
        chunks[-1].append(i)
    return [c for chunks in groups.values() for c in chunks]


def _rows(tensors, idx, rows: int, cols: int) -> torch.Tensor:
    """The tensors ``idx`` as one (len(idx)·rows, cols) matrix: a view of a lone one where it can be."""
    if len(idx) == 1:
        return tensors[idx[0]].reshape(rows, cols)
    return torch.stack([tensors[i].reshape(rows, cols) for i in idx]).view(len(idx) * rows, cols)


def _write(targets, idx, values: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Rows of ``values`` back into the tensors ``idx`` (of ``dtype``): a lone tensor takes them with
    the cast in its copy; a chunk's are cast once, then one multi-tensor copy."""
    if len(idx) == 1:
        targets[idx[0]].copy_(values.reshape(targets[idx[0]].shape))
        return
    pieces = values.to(dtype or values.dtype).reshape(len(idx), -1).unbind(0)
    torch._foreach_copy_([targets[i] for i in idx], [v.view(targets[i].shape) for v, i in zip(pieces, idx)])


def momentum_update(bufs, grads, scales, steps, seeds, *, momentum: float, nesterov: bool, form: str,
                    mode: LowPrecision, outs=None, offsets=None, scratch=None) -> list[torch.Tensor]:
    """The reference low-precision momentum step (the torch backend's path and the oracle of the
    kernels): M in fp32 from the stored M and G at its own precision, stored back stochastically
    rounded (bf16) or quantized (int8); returns U (Nesterov from the stored M) in fp32, or written
    into ``outs``. ``steps``: this step's counter per tensor (already advanced); ``offsets``: the
    index of each tensor's first element in its parameter (an FSDP2 shard's rows), so a shard draws
    the bits the whole parameter would; ``scratch(name, shape, dtype)``: where temporaries live (a
    CPU bucket keeps its own across steps), by default buffers of this call.

    Each chunk (``_chunks``) is one (rows, cols) matrix — the int8 blocks run along rows, so stacked
    tensors are just more rows — updated in place in its temporaries: one pass over memory per
    operation and no fresh buffer per operation (the kernels keep it all in registers)."""
    weight = 1.0 - momentum
    offsets = offsets or [0] * len(bufs)
    scratch = scratch or Scratch(bufs[0].device if bufs else torch.device("cpu"))  # this call's own
    results: list[torch.Tensor | None] = [None] * len(bufs)
    # every tensor's key at once: ~20 tiny operations per call instead of per chunk
    all_keys = random_bits.step_keys(seeds, steps) if mode.stochastic and bufs else None
    for idx in _chunks(bufs, grads):
        buf = bufs[idx[0]]
        rows, cols = buf.shape[0], math.prod(buf.shape[1:])
        shape = (len(idx) * rows, cols)
        g32 = _rows(grads, idx, rows, cols).to(torch.float32)  # read only: may be the gradient itself
        stored = _rows(bufs, idx, rows, cols)
        # M (then U) in a scratch buffer where U is copied out; else U is returned, so its own tensor
        m = (scratch("momentum", shape, torch.float32) if outs is not None
             else torch.empty(shape, dtype=torch.float32, device=buf.device))
        if mode.int8:
            _dequantize_into(m, stored, _rows(scales, idx, rows, scales[idx[0]].shape[1]))
        else:
            m.copy_(stored)
        if form == "ema":
            m.lerp_(g32, weight)
        else:
            m.mul_(momentum).add_(g32)
        bits = None
        if mode.stochastic:
            keys = (all_keys[idx[0]:idx[0] + 1] if len(idx) == 1 else all_keys.index_select(
                0, random_bits.device_constants(tuple(idx), torch.int64, all_keys.device)))
            flat = (len(idx), rows * cols)
            bits = random_bits.bits32(keys, [offsets[i] for i in idx], rows * cols, scratch("bits", flat, torch.int32),
                           scratch("shifted", flat, torch.int32)).view(shape)
        if mode.int8:
            y, scale = _quantize_(m, bits)
            _write(bufs, idx, y, torch.int8)  # exact: integers in [-127, 127]
            _write(scales, idx, scale)
            u = _dequantize_(y, scale)  # the stored M, in place of its values
        else:
            u = _stochastic_bf16_(m, bits)  # each value exactly a bf16: the stored M, in fp32
            _write(bufs, idx, u, buf.dtype)
        # A lone tensor with a contiguous fp32 slot takes the Nesterov blend there: a copy pass fewer.
        direct = (outs is not None and nesterov and len(idx) == 1 and outs[idx[0]].dtype == torch.float32
                  and outs[idx[0]].is_contiguous())
        blend = outs[idx[0]].view(shape) if direct else u
        if nesterov and form == "ema":
            torch.lerp(g32, u, momentum, out=blend)
        elif nesterov:
            torch.add(g32, u, alpha=momentum, out=blend)  # g + μ·M in one rounding, as the kernels and torch.optim.SGD
        if direct:
            results[idx[0]] = outs[idx[0]]
            continue
        for j, i in enumerate(idx):
            piece = u[j * rows:(j + 1) * rows].reshape(bufs[i].shape)
            results[i] = outs[i].copy_(piece) if outs is not None else piece
    return results
