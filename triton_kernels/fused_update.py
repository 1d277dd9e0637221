"""Multi-tensor fused kernels around Newton–Schulz, one launch per bucket each.

``fused_momentum``: M = μM + (1-μ)G (ema) or μM + G (sgd), then U = Nesterov(G, M) or M, written
straight into the bucket's (K, m, n) stack — tall matrices transposed on the way — so the momentum
update, the Nesterov blend and the stacking copy are one pass over memory.
``fused_apply_update``: W = (W·(1 - lr·wd)) + (-lr·scale)·O, reading each parameter's slice of the
orthogonalized stack (transposed back where needed), rounding to the parameter's dtype after each
of the two operations as torch's ``mul_`` then ``add_`` does.

Tensors are reached through tables of addresses (apex's multi-tensor pattern): a program table
maps each program to (tensor, chunk), so one launch covers every parameter of the bucket. All
math is fp32 in registers. Parameters, gradients and buffers must be contiguous; the backend
falls back to torch's foreach path otherwise. Where every tensor of a launch is whole (no column
piece), sized in multiples of 8 and 16-byte aligned (``aligned``), the kernels take their
16-byte path (``ALIGNED``): a pointer read from a table carries no alignment the compiler can
see, so without it every access is one instruction per element.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .config import cdiv, checked_grid, fp_fusion, is_interpreting, rounds_as_written
from .launch import launch

BLOCK = 1024
# per tensor: offset in the stack, rows, cols, transposed, neurons on columns, row stride in memory
META_COLUMNS: tl.constexpr = tl.constexpr(6)
# Elements of one 16-byte access at 16 bits: with ALIGNED every tensor's size and stack offset is a
# multiple of this and every address a multiple of 16 bytes (``aligned`` checks), so the kernels'
# loads and stores may be vectors (LDG.128/STG.128) instead of one instruction per element.
VECTOR: tl.constexpr = tl.constexpr(8)
# int8 momentum: a block's scale is max|m| times fl32(1/127) — the torch reference's constant
# (momentum_precision.INV_127): a GPU's torch divides by a Python number as a product by its
# reciprocal, so the reference multiplies and so does this kernel, to store the same bits.
INV_127: tl.constexpr = tl.constexpr(0.0078740157186985015869140625)
_BLOCK_INTERPRETER = 256  # at least one int8 quantization block (256) per program
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.int8: tl.int8}


@triton.jit
def _divmod(x, d, INDEX32: tl.constexpr):
    """(x // d, x % d) for non-negative int64 ``x`` and ``d``. With INDEX32 (the launcher checks that
    every index and size of the launch is below 2^31) the division is 32-bit: a few inline
    instructions, where an int64 one is a called ~180-instruction routine (sm_90 SASS) behind a
    32-bit fast-path test, per element of a kernel that should be bound by memory alone."""
    if INDEX32:
        q = (x.to(tl.uint32) // d.to(tl.uint32)).to(tl.int64)
    else:
        q = x // d
    return q, x - q * d


@triton.jit
def _transposed_index(Meta, t, idx, INDEX32: tl.constexpr):
    """Element ``idx`` of tensor ``t`` (row-major over its (batch, rows, cols) view) → (the tensor's
    offset in the stack, the element's place there if the tensor is tall, i.e. transposed)."""
    offset = tl.load(Meta + t * META_COLUMNS + 0)
    rows = tl.load(Meta + t * META_COLUMNS + 1)
    cols = tl.load(Meta + t * META_COLUMNS + 2)
    per = rows * cols
    b, rem = _divmod(idx, per, INDEX32)
    r, c = _divmod(rem, cols, INDEX32)
    return offset, offset + b * per + c * rows + r


@triton.jit
def _stack_index(Meta, t, idx, INDEX32: tl.constexpr):
    """Element ``idx`` of tensor ``t`` → its place in the stack: offset + idx for a wide tensor, the
    transposed place for a tall one. Both are formed and one chosen: in 32 bits the divisions are a
    few instructions, and a branch here made Triton 3.6's ptxas give the int8 momentum kernel a
    stack frame on sm_90 and sm_100 (the ALIGNED kernels branch instead: ``_store_stack``)."""
    offset, transposed = _transposed_index(Meta, t, idx, INDEX32)
    return tl.where(tl.load(Meta + t * META_COLUMNS + 3) != 0, transposed, offset + idx)


@triton.jit
def _wide_offset(Meta, t):
    """A wide tensor's offset in the stack, a multiple of VECTOR under ALIGNED (sizes are)."""
    return tl.multiple_of(tl.load(Meta + t * META_COLUMNS + 0), VECTOR)


@triton.jit
def _store_stack(Stack, Meta, t, idx, value, mask, INDEX32: tl.constexpr):
    """ALIGNED: ``value`` (element ``idx`` of tensor ``t``) into its place in the stack, in a branch
    per tensor, so that a wide tensor's store is a contiguous, aligned vector store."""
    if tl.load(Meta + t * META_COLUMNS + 3) != 0:
        _, place = _transposed_index(Meta, t, idx, INDEX32)
        tl.store(Stack + place, value, mask=mask)
    else:
        tl.store(Stack + _wide_offset(Meta, t) + idx, value, mask=mask)


@triton.jit
def _load_stack(Stack, Meta, t, idx, mask, INDEX32: tl.constexpr, ALIGNED: tl.constexpr):
    """Element ``idx`` of tensor ``t`` read from its place in the stack (ALIGNED: a branch per
    tensor, as ``_store_stack`` writes it)."""
    if ALIGNED:
        if tl.load(Meta + t * META_COLUMNS + 3) != 0:
            _, place = _transposed_index(Meta, t, idx, INDEX32)
            value = tl.load(Stack + place, mask=mask, other=0.0)
        else:
            value = tl.load(Stack + _wide_offset(Meta, t) + idx, mask=mask, other=0.0)
    else:
        value = tl.load(Stack + _stack_index(Meta, t, idx, INDEX32), mask=mask, other=0.0)
    return value


@triton.jit
def _chunk(ChunkTensor, ChunkStart, Numels, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's (tensor, element indices, mask, tensor size). Under ALIGNED the compiler is
    told what make_layout guarantees (chunks start at multiples of BLOCK) and what the launcher
    checked (sizes are multiples of VECTOR, so the mask is constant over each vector). The
    per-element path keeps its code as it was: the hints alone gave Triton 3.6's fp16 sgd kernel an
    8-byte stack frame on sm_120."""
    pid = tl.program_id(0)
    t = tl.load(ChunkTensor + pid)
    start = tl.load(ChunkStart + pid)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(Numels + t)
    if ALIGNED:
        numel = tl.multiple_of(numel, VECTOR)
    return t, idx, idx < numel, numel


@triton.jit
def _tensor(Ptrs, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s data pointer from an address table (16-byte aligned under ALIGNED)."""
    pointer = tl.load(Ptrs + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # on the pointer itself: the hint does not pass through the int-to-pointer cast
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _memory_index(Meta, t, idx, INDEX32: tl.constexpr, ALIGNED: tl.constexpr):
    """Element ``idx`` of tensor ``t`` → its offset in the tensor's memory: ``idx`` for a contiguous
    tensor; row·stride + col for a split piece that is a column block of a wider matrix (never
    under ALIGNED: the launcher checks that no tensor is such a piece)."""
    if ALIGNED:
        mem = idx
    else:
        cols = tl.load(Meta + t * META_COLUMNS + 2)
        stride = tl.load(Meta + t * META_COLUMNS + 5)
        if stride == cols:
            mem = idx
        else:
            r, c = _divmod(idx, cols, INDEX32)
            mem = r * stride + c
    return mem


@triton.jit
def _round(x, DTYPE: tl.constexpr, EMULATE_RN: tl.constexpr):
    """fp32 → DTYPE with round-to-nearest-even. The CPU interpreter truncates fp32 → bf16, so there
    the rounding is done on the bits first (its truncation is then exact); GPUs round natively."""
    if EMULATE_RN and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _fma(a, b, c, EMULATE_RN: tl.constexpr):
    """a·b + c rounded once. The CPU interpreter has no fused multiply-add: there the fp32 product
    is formed exactly in fp64 and the sum rounded from it (equal to the fused result but for rare
    double-rounding ties)."""
    if EMULATE_RN:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    return tl.fma(a, b, c)


@triton.jit
def _lerp(a, b, w, EMULATE_RN: tl.constexpr):
    """torch's lerp, branch for branch and rounding for rounding: it switches formula at |w| = 0.5
    for accuracy, and its CPU and CUDA kernels both fuse each multiply-add."""
    diff = b - a
    return tl.where(tl.abs(w) < 0.5, _fma(w, diff, a, EMULATE_RN), _fma(-diff, 1.0 - w, b, EMULATE_RN))


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 (muon_kernels/random_bits.py: the same function in torch)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _max_keeping_nan(a, b):
    """``tl.max``'s combine drops a NaN on a GPU (``max.f32``; the interpreter's ``nanmax`` too): an int8
    block's scale must be NaN where the block holds one, as torch's ``amax`` is in the reference."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _low_precision_store(m, buf, idx, mem, numel, mask, bits, ScalePtrs, t, BLOCK: tl.constexpr,
                         INT8: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store fp32 momentum ``m`` as int8 + block scales or as stochastically rounded bf16 (the
    reference's arithmetic: muon_kernels/momentum_precision.py); returns the stored value in fp32."""
    if INT8:
        QB: tl.constexpr = 256
        scale = tl.reduce(tl.reshape(tl.abs(m), (BLOCK // QB, QB)), 1, _max_keeping_nan) * INV_127
        scale_e = tl.reshape(tl.broadcast_to(scale[:, None], (BLOCK // QB, QB)), (BLOCK,))
        y = tl.div_rn(m, tl.where(scale_e > 0, scale_e, 1.0))
        if STOCHASTIC:
            y = tl.floor(y + (bits >> 8).to(tl.float32) * 5.9604644775390625e-08)  # + U[0, 1), 24 bits
        else:
            y = tl.floor(y + 0.5)
        # A NaN (a block with a NaN or an infinity: its scale is NaN or inf) is stored as 0, what torch's
        # float → int8 conversion gives it; the clamp alone would make it -127 (max.f32 drops a NaN).
        y = tl.where(y == y, tl.minimum(tl.maximum(y, -127.0), 127.0), 0.0)
        tl.store(buf + idx, y.to(tl.int8), mask=mask)
        first = tl.min(tl.reshape(idx, (BLOCK // QB, QB)), axis=1)  # each block's first element
        scale_ptr = tl.load(ScalePtrs + t).to(tl.pointer_type(tl.float32))
        tl.store(scale_ptr + first // QB, scale, mask=first < numel)
        return y * scale_e
    else:
        raw = m.to(tl.uint32, bitcast=True)
        rounded = ((raw + (bits & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        rounded = tl.where(m != m, m, rounded)  # NaN stays NaN
        tl.store(buf + mem, rounded.to(tl.bfloat16), mask=mask)  # exact: the low bits are zero
        return rounded


# This kernel and the update kernel round as written (``config.rounds_as_written``: no multiply-add
# contraction; the matmul kernels keep config.FP_FUSION): every rounding is the one the code spells
# out, a fused multiply-add only where it says ``_fma`` (where torch's op is one: lerp, add with
# alpha). With contraction on, ptxas fused the SGD buffer's ``μ·M + G`` (torch.optim.SGD's mul_ then
# add_: two roundings) into one FMA on sm_90, and the CPU interpreter, which never fuses, could not
# show it (tests/test_triton_aot.py reads the PTX).
@rounds_as_written
@triton.jit
def _fused_momentum_kernel(
    GradPtrs, BufPtrs, Meta, Numels, Momenta, ChunkTensor, ChunkStart, Stack, Seeds, StepPtrs, ScalePtrs,
    GRAD_DTYPE: tl.constexpr, BUF_DTYPE: tl.constexpr, EMA: tl.constexpr, NESTEROV: tl.constexpr,
    BLOCK: tl.constexpr, EMULATE_RN: tl.constexpr, INDEX32: tl.constexpr, INT8: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = False, ALIGNED: tl.constexpr = False,
):
    t, idx, mask, numel = _chunk(ChunkTensor, ChunkStart, Numels, BLOCK, ALIGNED)
    mem = _memory_index(Meta, t, idx, INDEX32, ALIGNED)
    grad = _tensor(GradPtrs, t, GRAD_DTYPE, ALIGNED)
    buf = _tensor(BufPtrs, t, BUF_DTYPE, ALIGNED)
    mu = tl.load(Momenta + 2 * t)
    weight = tl.load(Momenta + 2 * t + 1)  # fp32(1 - μ), rounded on the host as torch does
    if INT8 or STOCHASTIC:
        # Low-precision momentum: M in fp32 from the stored M and G at its own precision, stored
        # back quantized / stochastically rounded; U from the stored M.
        g = tl.load(grad + mem, mask=mask, other=0.0).to(tl.float32)
        if INT8:
            scale_ptr = tl.load(ScalePtrs + t).to(tl.pointer_type(tl.float32))
            old = tl.load(buf + idx, mask=mask, other=0).to(tl.float32) * tl.load(scale_ptr + idx // 256,
                                                                                  mask=mask, other=0.0)
        else:
            old = tl.load(buf + mem, mask=mask, other=0.0).to(tl.float32)
        bits = idx.to(tl.uint32)
        if STOCHASTIC:
            step = tl.load(tl.load(StepPtrs + t).to(tl.pointer_type(tl.int64)))
            key = _hash32(_hash32(step.to(tl.uint32)) ^ tl.load(Seeds + t).to(tl.uint32))
            bits = _hash32(bits ^ key)
        if EMA:
            m = _lerp(old, g, weight, EMULATE_RN)
        else:
            m = mu * old + g
        m = _low_precision_store(m, buf, idx, mem, numel, mask, bits, ScalePtrs, t, BLOCK, INT8, STOCHASTIC)
    else:
        # The gradient is first rounded to the buffer's dtype, as torch does before lerp.
        g = _round(tl.load(grad + mem, mask=mask, other=0.0).to(tl.float32), BUF_DTYPE, EMULATE_RN).to(tl.float32)
        m = tl.load(buf + mem, mask=mask, other=0.0).to(tl.float32)
        # Same operations and roundings as the torch path: lerp_ / (mul_, add_) on the buffer, then
        # lerp / add(alpha=μ) for Nesterov, each rounded to the buffer's dtype.
        if EMA:
            m = _lerp(m, g, weight, EMULATE_RN)
        else:
            m = _round(mu * m, BUF_DTYPE, EMULATE_RN).to(tl.float32) + g
        m = _round(m, BUF_DTYPE, EMULATE_RN)
        tl.store(buf + mem, m, mask=mask)
    if NESTEROV:
        if EMA:
            u = _lerp(g, m.to(tl.float32), mu, EMULATE_RN)
        else:  # g + μ·M in one rounding, as torch.add(g, M, alpha=μ) computes it (CPU and CUDA)
            u = _fma(mu, m.to(tl.float32), g, EMULATE_RN)
    else:
        u = m
    if ALIGNED:
        _store_stack(Stack, Meta, t, idx, _round(u.to(tl.float32), Stack.dtype.element_ty, EMULATE_RN), mask, INDEX32)
    else:  # written as before the vector path, so this path compiles as it did (ptxas's stack frames)
        tl.store(Stack + _stack_index(Meta, t, idx, INDEX32), _round(u.to(tl.float32), Stack.dtype.element_ty,
                                                                     EMULATE_RN), mask=mask)


@rounds_as_written
@triton.jit
def _fused_apply_update_kernel(
    ParamPtrs, Meta, Numels, Alphas, Decays, ChunkTensor, ChunkStart, Ortho, RowScale, Gains, Shrink, NMAX,
    PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RN: tl.constexpr, CAUTIOUS: tl.constexpr,
    NORMUON: tl.constexpr, HYPERBALL: tl.constexpr, INDEX32: tl.constexpr, ALIGNED: tl.constexpr = False,
):
    t, idx, mask, _ = _chunk(ChunkTensor, ChunkStart, Numels, BLOCK, ALIGNED)
    param = _tensor(ParamPtrs, t, PARAM_DTYPE, ALIGNED)
    mem = _memory_index(Meta, t, idx, INDEX32, ALIGNED)
    w = tl.load(param + mem, mask=mask, other=0.0).to(tl.float32)
    o = _load_stack(Ortho, Meta, t, idx, mask, INDEX32, ALIGNED).to(tl.float32)
    if NORMUON or HYPERBALL:  # O_eff = g·s⊙O (muon_kernels/variants.py), per matrix k and neuron
        rows = tl.load(Meta + t * META_COLUMNS + 1)
        cols = tl.load(Meta + t * META_COLUMNS + 2)
        per = rows * cols
        b, rc = _divmod(idx, per, INDEX32)
        k = tl.load(Meta + t * META_COLUMNS + 0) // per + b
        o = o * tl.load(Gains + k, mask=mask, other=0.0)
        if NORMUON:
            r, c = _divmod(rc, cols, INDEX32)
            neuron = tl.where(tl.load(Meta + t * META_COLUMNS + 4) != 0, c, r)
            o = o * tl.load(RowScale + k * NMAX + neuron, mask=mask, other=0.0)
    o = _round(o, PARAM_DTYPE, EMULATE_RN).to(tl.float32)  # O is cast to the parameter's dtype first
    decay = tl.load(Decays + t)
    if CAUTIOUS:  # decay only where W·O >= 0 (cautious weight decay), from the signs: no underflow
        decay = tl.where(((w >= 0) == (o >= 0)) | (w == 0) | (o == 0), decay, 1.0)
    w = _round(w * decay, PARAM_DTYPE, EMULATE_RN).to(tl.float32)  # W *= 1 - lr·wd, like mul_
    w = _fma(tl.load(Alphas + t), o, w, EMULATE_RN)  # then W += (-lr·scale)·O in one rounding, like add_
    if HYPERBALL:  # back onto the sphere: W *= c, like mul_
        w = _round(w, PARAM_DTYPE, EMULATE_RN).to(tl.float32) * tl.load(Shrink + k, mask=mask, other=0.0)
    tl.store(param + mem, _round(w, PARAM_DTYPE, EMULATE_RN), mask=mask)


def _block() -> int:
    return _BLOCK_INTERPRETER if is_interpreting() else BLOCK


def index32(stack: torch.Tensor) -> bool:
    """Whether every element index of a launch over ``stack``'s tensors (each at most the stack,
    plus one block of masked lanes) fits the kernels' 32-bit index arithmetic (``_divmod``)."""
    return stack.numel() + _block() < 2**31


class Layout(NamedTuple):
    """Where each tensor of a bucket lives in its stack, and the program table that covers them all.

    Depends only on the bucket's shapes, so the backend builds it once per plan, not every step.
    """

    chunk_tensor: torch.Tensor  # int32 per program: which tensor
    chunk_start: torch.Tensor  # int64 per program: first element of its chunk
    numels: torch.Tensor  # int64 per tensor
    meta: torch.Tensor  # int64 per tensor: (offset in the stack, rows, cols, transposed, neurons on columns, row stride)
    # Every tensor contiguous (no column pieces) with a size that is a multiple of VECTOR: the
    # kernels may use 16-byte accesses when the step's addresses are aligned too (``aligned``).
    vectorizable: bool


def make_layout(views, device: torch.device) -> Layout:
    """``views``: (batch, rows, cols, transposed, neurons on columns, row stride) per tensor, in stack
    order; the row stride is ``cols`` for a contiguous tensor."""
    block = _block()
    numels = [b * r * c for b, r, c, *_ in views]
    counts = torch.tensor([cdiv(n, block) for n in numels])
    chunk_tensor = torch.repeat_interleave(torch.arange(len(views), dtype=torch.int32), counts)
    chunk_start = torch.cat([torch.arange(int(c), dtype=torch.int64) * block for c in counts])
    offsets = [0]
    for n in numels[:-1]:
        offsets.append(offsets[-1] + n)
    meta = torch.tensor([(o, r, c, int(t), int(nc), ld) for o, (_, r, c, t, nc, ld) in zip(offsets, views)],
                        dtype=torch.int64)
    vectorizable = all(n % VECTOR.value == 0 and ld == c for n, (_, _, c, _, _, ld) in zip(numels, views))
    return Layout(chunk_tensor.to(device), chunk_start.to(device), torch.tensor(numels, dtype=torch.int64).to(device),
                  meta.to(device), vectorizable)


def aligned(layout: Layout, *addresses: int) -> bool:
    """Whether a launch over ``layout`` may take the kernels' 16-byte vector path (ALIGNED): the
    layout allows it and every tensor's address (parameters, gradients, buffers, the stack) is a
    multiple of 16 bytes. A gradient bucket view or a parameter inside a flat buffer may not be."""
    return layout.vectorizable and not functools.reduce(operator.or_, addresses, 0) & 15


# Device copies of pointer tables, keyed by (device, pointers). A table only holds numbers, so an
# entry is never stale; reusing it means a step whose tensors did not move copies nothing to the
# device, which is what CUDA-graph capture needs (no host-to-device copy may be captured). Eager
# steps whose gradients are reallocated every step (zero_grad(set_to_none=True)) make new tables,
# so those live in a bounded LRU; a table used while a CUDA graph is being captured is pinned for
# the life of the process instead, because the graph replays with its address baked in. The bound
# holds every table of a step many times over (3–7 per bucket: a step of a few hundred buckets, a
# large model's under max_workspace_bytes, must not evict its own tables, which would copy them
# to the device again every step and make the step uncapturable); a table is a few hundred bytes.
_ADDRESS_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_ADDRESS_TABLES_MAX = 8192
_PINNED_TABLES: dict[tuple, torch.Tensor] = {}
# Optimizers stepping in threads share the tables: a lookup's move_to_end must not meet another
# thread's eviction of that key.
_TABLES_LOCK = threading.Lock()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _addresses(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return int_table(pointers(tensors), device)


def pointers(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple([t.data_ptr() for t in tensors])


def int_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An int64 device copy of ``values`` (addresses and sizes), cached as described above."""
    key = (device, values)
    capturing = _capturing(device)
    with _TABLES_LOCK:
        table = _PINNED_TABLES.get(key)
        if table is None:
            table = _ADDRESS_TABLES.get(key)
            if table is not None:
                _ADDRESS_TABLES.move_to_end(key)
        if table is not None:
            if capturing:
                _PINNED_TABLES[key] = table
            return table
        if capturing:
            raise RuntimeError(
                "muon_kernels: a parameter, gradient or momentum buffer was reallocated since the last eager step, so "
                "its address table would have to be copied to the GPU during CUDA-graph capture; run one eager "
                "opt.step() with the same (static) tensors before capturing, and keep gradients allocated "
                "(zero_grad(set_to_none=False))"
            )
        table = torch.tensor(key[1], dtype=torch.int64).to(device)
        _ADDRESS_TABLES[key] = table
        if len(_ADDRESS_TABLES) > _ADDRESS_TABLES_MAX:
            _ADDRESS_TABLES.popitem(last=False)
        return table


def fused_momentum(grads, bufs, momenta: torch.Tensor, layout: Layout, stack: torch.Tensor, *, ema: bool,
                   nesterov: bool, scales=(), steps=(), seeds=()) -> None:
    """Update ``bufs`` in place and write U for every tensor into ``stack`` (see module docstring).
    ``momenta``: fp32 device tensor, (μ, 1 - μ) per tensor. Low-precision momentum
    (muon_kernels/momentum_precision.py): int8 ``bufs`` with their fp32 block ``scales``; ``steps``
    (int64 step counters) and ``seeds`` (ints) per tensor for stochastic rounding."""
    device = stack.device
    layout = Layout(*layout)
    int8, stochastic = bufs[0].dtype == torch.int8, bool(steps)
    grad_ptrs, buf_ptrs = pointers(grads), pointers(bufs)
    # Low-precision momentum keeps the per-element path: its block scales and hashed bits are not
    # what a vector path would speed up, and a branch per tensor gave Triton 3.6's int8 kernel a
    # stack frame (``_stack_index``).
    vector = not (int8 or stochastic) and aligned(layout, *grad_ptrs, *buf_ptrs, stack.data_ptr())
    launch(_fused_momentum_kernel, (checked_grid(layout.chunk_tensor.numel(), "fused_momentum"),),
        int_table(grad_ptrs, device), int_table(buf_ptrs, device), layout.meta, layout.numels, momenta,
        layout.chunk_tensor, layout.chunk_start, stack,
        int_table(tuple(seeds), device) if stochastic else momenta,
        _addresses(list(steps), device) if stochastic else momenta,
        _addresses(list(scales), device) if int8 else momenta,
        GRAD_DTYPE=_TL_DTYPES[grads[0].dtype], BUF_DTYPE=_TL_DTYPES[bufs[0].dtype], EMA=ema, NESTEROV=nesterov,
        BLOCK=_block(), EMULATE_RN=is_interpreting(), INDEX32=index32(stack), INT8=int8, STOCHASTIC=stochastic,
        ALIGNED=vector, enable_fp_fusion=fp_fusion(_fused_momentum_kernel),
    )


def fused_apply_update(params, alphas: torch.Tensor, decays: torch.Tensor, layout: Layout, ortho: torch.Tensor,
                       cautious: bool = False, row_scale: torch.Tensor | None = None,
                       gains: torch.Tensor | None = None, shrink: torch.Tensor | None = None) -> None:
    """``W = (W·decay) + alpha·O`` for every parameter, O read from its slice of ``ortho``; with
    ``cautious``, the decay only where W·O >= 0.
    ``alphas``/``decays``: fp32 device tensors, one value per parameter (computed on the device from
    a tensor lr, so a scheduler changing lr needs neither a recompile nor a host round trip).
    Variants (muon_kernels/variants.py): O is first multiplied by ``gains`` (one per matrix) and
    ``row_scale`` ((matrices, n), per neuron: NorMuon); ``shrink`` (one per matrix: the hyperball)
    multiplies the result."""
    device = ortho.device
    layout = Layout(*layout)
    placeholder = alphas  # never read: the constexpr branches that would read them are compiled out
    param_ptrs = pointers(params)
    launch(_fused_apply_update_kernel, (checked_grid(layout.chunk_tensor.numel(), "fused_apply_update"),),
        int_table(param_ptrs, device), layout.meta, layout.numels, alphas, decays,
        layout.chunk_tensor, layout.chunk_start, ortho, placeholder if row_scale is None else row_scale,
        placeholder if gains is None else gains, placeholder if shrink is None else shrink, ortho.shape[-1],
        PARAM_DTYPE=_TL_DTYPES[params[0].dtype], BLOCK=_block(), EMULATE_RN=is_interpreting(), CAUTIOUS=cautious,
        NORMUON=row_scale is not None, HYPERBALL=shrink is not None, INDEX32=index32(ortho),
        ALIGNED=aligned(layout, *param_ptrs, ortho.data_ptr()),
        enable_fp_fusion=fp_fusion(_fused_apply_update_kernel),
    )
