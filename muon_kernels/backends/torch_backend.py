"""Pure-PyTorch reference backend: batched Newton–Schulz with ``bmm``/``baddbmm``, foreach momentum
and update.

It is the ground truth that every kernel is tested against and the path CPU users run, so it
does the plainest thing: multi-tensor ``_foreach_*`` ops for momentum and the update, one ``cat``
per bucket, normalization in fp32, one cast to the iteration dtype, and the recurrence on the
whole stack with one batched GEMM per term.
"""

from __future__ import annotations

import functools
import threading
from collections import defaultdict

import torch

from .. import momentum_precision, recurrence, variants, workspace
from ..bucket import Bucket
from ..ns_config import NSConfig
from ..scalars import update_scalars

NAME = "torch"


def status(device: torch.device | None = None) -> tuple[bool, str]:
    return True, "pure PyTorch (batched bmm/baddbmm); runs on every device"


def momentum_update(
    bufs: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    momentum: float,
    nesterov: bool,
    form: str,
    outs: list[torch.Tensor] | None = None,
    scratch: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Update the momentum buffers in place and return the update U fed to Newton–Schulz.

    ema: M = μM + (1-μ)G;  U = (1-μ)G + μM (nesterov) or M.
    sgd: M = μM + G;       U = G + μM (nesterov) or M.
    The ema form uses lerp exactly as torch.optim.Muon does, so fp32 results agree bit for bit.
    With ``outs`` (views of the same shapes), U is written there instead of into new tensors; a
    flat ``scratch`` buffer (as many elements as the largest) takes the blend first where an out is
    not contiguous (a tall matrix's transposed slot in a CPU stack): an elementwise op writing through
    a transposed view ran 9× slower than into contiguous memory, and one copy_ costs less than that.
    """
    grads = [g if g.dtype == b.dtype else g.to(b.dtype) for g, b in zip(grads, bufs)]
    if form == "ema":
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
    else:
        torch._foreach_mul_(bufs, _scalar(momentum, bufs))
        torch._foreach_add_(bufs, grads)
    if outs is None:
        if not nesterov:
            return list(bufs)
        if form == "ema":
            return torch._foreach_lerp(grads, bufs, momentum)
        return torch._foreach_add(grads, bufs, alpha=momentum)
    for g, b, out in zip(grads, bufs, outs):
        slot = scratch is not None and out.ndim == 2 and not out.is_contiguous() and out.mT.is_contiguous()
        u = b
        if nesterov:
            u = scratch[: out.numel()].view(out.shape) if slot else out
            if form == "ema":
                torch.lerp(g, b, momentum, out=u)
            else:
                torch.add(g, b, alpha=momentum, out=u)
        if slot:
            transpose_into(out.mT, u)
        elif u is not out:
            out.copy_(u)
    return outs


# Rows of a tall matrix transposed per copy_ (bench/README.md, CPU strategy).
TRANSPOSE_BLOCK_ROWS = 256


def transpose_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst ← srcᵀ`` for a contiguous 2D ``dst``. A tall ``src`` goes in blocks of
    TRANSPOSE_BLOCK_ROWS rows, whose transposes stay in cache: 2–2.5× faster than one strided
    copy_ for 2048×512 to 3072×768 fp32 on the development CPU; a wide one in one copy_ (blocks
    were slower there)."""
    rows, cols = src.shape
    if rows < 2 * TRANSPOSE_BLOCK_ROWS or rows <= cols:
        return dst.copy_(src.T)
    for r in range(0, rows, TRANSPOSE_BLOCK_ROWS):
        dst[:, r:r + TRANSPOSE_BLOCK_ROWS].copy_(src[r:r + TRANSPOSE_BLOCK_ROWS].T)
    return dst


def _cpu_slots(bucket: Bucket) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None] | None:
    """On a CPU: the bucket's stack buffer, reused every step, each entry's view of it, and the blend
    scratch a tall matrix's transposed slot needs; None where an entry's slot is no view (a
    transposed conv filter). Depends only on the plan, so built once."""
    if "cpu_slots" not in bucket.cache:
        stack = bucket.scratch("stack", bucket.stack_shape, bucket.dtype)
        slots = [bucket.slot(stack, i) for i in range(len(bucket.entries))]
        scratch = None
        if any(s is None for s in slots):
            bucket.cache["cpu_slots"] = None
            return None
        if any(bucket.transposed_in_stack(e) for e in bucket.entries):
            scratch = bucket.scratch("blend", (bucket.m * bucket.n * max(e.view.batch for e in bucket.entries),),
                                    bucket.dtype)
        bucket.cache["cpu_slots"] = (stack, slots, scratch)
    return bucket.cache["cpu_slots"]


def _cpu_scratch(bucket: Bucket) -> workspace.Scratch | None:
    """A CPU bucket's low-precision momentum temporaries, kept across steps (fresh large buffers
    page-fault on every step there); elsewhere each call's own (the caching allocator reuses them)."""
    return bucket.scratch if bucket.device.type == "cpu" else None


def momentum_stack(bucket: Bucket, grads, bufs, groups: list[dict], state=None) -> torch.Tensor:
    """Momentum (foreach, per group of the bucket) and the updates laid out as the bucket says (a
    (K, m, n) stack, tall matrices transposed; or row by row), never aliasing a buffer.

    On a CPU the Nesterov blend is written straight into the stack (one pass over memory fewer
    than blending into new tensors and concatenating them), and the stack is the bucket's own
    buffer, reused every step (bench/README.md, CPU strategy); elsewhere multi-tensor (foreach) ops
    and one ``cat`` keep the launch count low.
    """
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(bucket.entries):
        by_group[e.group].append(i)
    # Not while torch.compile traces: the compiled step allocates its own buffers, and a stack
    # cached in the bucket by a traced step came back flattened to 1-D under torch 2.11's Dynamo.
    slots = _cpu_slots(bucket) if bucket.device.type == "cpu" and not torch.compiler.is_compiling() else None
    stack, targets, scratch = slots or (None, [None] * len(bucket.entries), None)
    updates: list[torch.Tensor | None] = [None] * len(bucket.entries)
    low = bucket.low_precision
    scales, steps, seeds = momentum_precision.state_tensors(bucket, state) if low.active else ([], [], [])
    pick = lambda values, idx: [values[i] for i in idx] if values else []  # noqa: E731
    for gi, idx in by_group.items():
        outs = None if stack is None else [targets[i] for i in idx]
        if low.active:
            us = momentum_precision.momentum_update(
                [bufs[i] for i in idx], [grads[i] for i in idx], pick(scales, idx), pick(steps, idx),
                pick(seeds, idx), momentum=groups[gi]["momentum"], nesterov=bucket.nesterov,
                form=bucket.momentum_form, mode=low, outs=outs, offsets=[bucket.entries[i].offset for i in idx],
                scratch=_cpu_scratch(bucket))
        else:
            us = momentum_update([bufs[i] for i in idx], [grads[i] for i in idx], momentum=groups[gi]["momentum"],
                                 nesterov=bucket.nesterov, form=bucket.momentum_form, outs=outs, scratch=scratch)
        for i, u in zip(idx, us):
            updates[i] = u
    if stack is not None:
        return stack
    if bucket.layout == "rows":
        return torch.cat([u.reshape(-1) for u in updates]).to(bucket.dtype)
    views = []
    for e, u in zip(bucket.entries, updates):
        u = u.reshape(e.view.batch, e.view.rows, e.view.cols)
        views.append(u.mT if e.view.transposed else u)
    return torch.cat(views, dim=0).to(bucket.dtype)


# The CPU strategy (bench/README.md): a Newton–Schulz call's temporaries (X, the next X, A, B) stay
# under CPU_CALL_BYTES, because larger allocations are fresh mmaps that page-fault on every step
# (a 24-matrix 768×3072 call spent more time faulting in its copies than a per-matrix loop spends
# on its whole elementwise half); and fp32 matrices of at least CPU_FP32_SINGLE_ELEMENTS go one per
# call, where batched fp32 GEMMs ran 20–35% slower than single ones. Matrices of at least
# CPU_SYMMETRIC_MIN_ROWS rows go one per call too and form their symmetric products (X·Xᵀ, A·A) from
# their upper block triangle, in row blocks of about CPU_SYMMETRIC_BLOCK_ROWS: bf16 X·Xᵀ 1.26–1.36×
# faster at 384–768 rows, 1.4–1.66× at 1024–2048 (blocks of 256 rows were best or near it at every
# size measured); below 384 rows batching the matrices gains more than the blocks do.
CPU_CALL_BYTES = 24 * 2**20
CPU_FP32_SINGLE_ELEMENTS = 2**19
CPU_SYMMETRIC_MIN_ROWS = 768
CPU_SYMMETRIC_BLOCK_ROWS = 256


def matrices_per_call(m: int, n: int, ns_dtype: torch.dtype, device: torch.device) -> int | None:
    """How many m×n matrices one orthogonalization call takes (None: the whole bucket)."""
    if device.type != "cpu":
        return None
    if m >= CPU_SYMMETRIC_MIN_ROWS or (ns_dtype == torch.float32 and m * n >= CPU_FP32_SINGLE_ELEMENTS):
        return 1
    return max(1, CPU_CALL_BYTES // (torch.finfo(ns_dtype).bits // 8 * (2 * m * n + 2 * m * m)))


def paths(m: int, n: int, ns_dtype: torch.dtype, device: torch.device, config: NSConfig | None = None) -> tuple[str, ...]:
    """One path: the batched GEMMs (on a CPU in the chunks ``matrices_per_call`` says)."""
    return (kernel_path(m, n, ns_dtype, device, config)[0],)


def kernel_path(m: int, n: int, ns_dtype: torch.dtype, device: torch.device,
                config: NSConfig | None = None, path: str | None = None) -> tuple[str, str]:
    per_call = matrices_per_call(m, n, ns_dtype, device)
    if per_call is None:
        return "baddbmm", "reference recurrence: one batched GEMM per term, any shape"
    if m >= CPU_SYMMETRIC_MIN_ROWS:
        return "symmetric-mm", (f"CPU: one matrix per call, X·Xᵀ and A·A from their upper block triangle "
                                f"(m >= {CPU_SYMMETRIC_MIN_ROWS}), stack reused across steps")
    return "baddbmm", (f"CPU: up to {per_call} matrices per call (temporaries under "
                       f"{CPU_CALL_BYTES // 2**20} MiB; large fp32 matrices one at a time), stack reused across steps")


# Largest power-of-two exponent e with 2^e and 2^-e both normal, per accumulation dtype.
_MAX_EXPONENT = {torch.float32: 126, torch.float64: 1022}
# (mantissa bits, exponent bias, integer type of the same width)
_FLOAT_LAYOUT = {torch.float32: (23, 127, torch.int32), torch.float64: (52, 1023, torch.int64)}


def _power_of_two(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^exponent built from its bits (exact; ``torch.ldexp`` goes through fp32 ``pow``)."""
    shift, bias, int_dtype = _FLOAT_LAYOUT[dtype]
    return ((exponent.to(int_dtype) + bias) << shift).view(dtype)


# A CPU thread's buffer for normalize's scaled copy (a ``Scratch`` per thread, so two optimizers
# stepping in two threads never share one): a fresh buffer of that size is a fresh mmap, and its
# page faults cost a GPT-2-small-÷4 step more than the arithmetic. Reused only where normalize
# returns a cast copy (a 16-bit iteration), never the buffer itself.
_thread = threading.local()


def _scaled_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, reusable: bool) -> torch.Tensor:
    # Not kept under a dispatch mode (fake tensors): a buffer made there is no real tensor's scratch.
    if (device.type != "cpu" or not reusable or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0):
        return torch.empty(shape, dtype=dtype, device=device)
    if not hasattr(_thread, "scratch"):
        _thread.scratch = workspace.Scratch(device)
    return _thread.scratch(("normalize", dtype), shape, dtype)


def normalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype, consume: bool = False) -> torch.Tensor:
    """``stack / max(norm_scale·‖stack‖_F + norm_offset, floor)`` per matrix, in fp32 (fp64 for fp64
    input), cast to ns_dtype, in one canonical (contiguous) layout.

    The norm is overflow- and underflow-safe and accurate: each matrix is first scaled by a power of
    two near its largest |x| (exact, so the result is bitwise what the unscaled formula gives
    whenever that one neither overflows nor underflows), and the sum of squares is taken in two
    stages (row norms, then their norm), because a one-pass fp32 ``vector_norm`` over a whole matrix
    loses up to 6e-4 on a CPU. The divisor is never formed unscaled, so ``‖U‖²`` beyond fp32's
    range still normalizes (1e30 gradients) and eps = 0 still orthogonalizes 1e-30 ones. One path
    on every device, with no host sync. The input is made contiguous first and the output is a new
    contiguous tensor (with ``consume``, an fp32 stack is scaled in place, and may be the output), so
    results do not depend on the input's strides.
    """
    acc = torch.promote_types(stack.dtype, torch.float32)  # fp32, or fp64 for fp64 parameters
    stack = stack.contiguous()
    k, m, n = stack.shape
    # max |x| (NaN stays NaN) from amax and amin: on a CPU the inf-norm and aminmax reductions over
    # a matrix were 25× slower than these two.
    amax = torch.maximum(stack.amax(dim=(-2, -1)), -stack.amin(dim=(-2, -1))).to(acc)
    _, exponent = torch.frexp(amax)  # amax = f·2^e, f in [0.5, 1); 0, inf and NaN give e = 0
    limit = _MAX_EXPONENT[acc]
    inv = _power_of_two(-exponent.clamp(-limit, limit), acc).view(k, 1, 1)  # 2^-e: scaled |x| < 1
    # The scaled copy over the stack itself where the caller gives it up (``consume``) and it is fp32.
    over = consume and stack.dtype == acc
    y = torch.mul(stack, inv, out=stack if over else _scaled_buffer((k, m, n), acc, stack.device,
                                                                    reusable=ns_dtype != acc))
    norms = torch.linalg.vector_norm(torch.linalg.vector_norm(y, dim=-1), dim=-1).view(k, 1, 1)
    # Everything in the scaled domain: ‖y‖ = ‖x‖·2^-e, so the divisor is denom·2^-e.
    denom = torch.maximum(norms * config.norm_scale + config.norm_offset * inv, config.floor * inv)
    # In place, then one cast: the quotient is rounded to fp32 either way, and a CPU divides into a
    # 16-bit output 10× slower than in place.
    y.div_(denom)
    return y if ns_dtype == acc else y.to(ns_dtype)


MATMUL_OPS = recurrence.BATCHED_GEMM_OPS


def symmetric_matmul(X: torch.Tensor, out: torch.Tensor, add: torch.Tensor | None = None,
                     beta: float = 0.0, alpha: float = 1.0) -> torch.Tensor:
    """``out = beta·add + alpha·X·Xᵀ`` for one m×k matrix X (``add`` symmetric, or None for beta = 0),
    computing only the upper block triangle: X's rows in blocks of about CPU_SYMMETRIC_BLOCK_ROWS,
    each block against the columns from its own first row on, and every block below the diagonal
    mirrored from the one above it. Each entry is the same dot product the full GEMM forms (bitwise
    the same on the CPUs measured, whose GEMMs reduce along k in a fixed order); with b blocks it
    does (b + 1)/(2b) of the full product's multiply-adds."""
    m = X.shape[0]
    blocks = max(2, -(-m // CPU_SYMMETRIC_BLOCK_ROWS))
    edges = [m * i // blocks for i in range(blocks + 1)]
    for a, b in zip(edges, edges[1:]):
        if a == 0:  # the first block row is whole rows of out: written in place
            if add is None:
                torch.mm(X[a:b], X.T, out=out[a:b])
            else:
                torch.addmm(add[a:b], X[a:b], X.T, beta=beta, alpha=alpha, out=out[a:b])
        elif add is None:
            out[a:b, a:] = torch.mm(X[a:b], X[a:].T)
        else:
            out[a:b, a:] = torch.addmm(add[a:b, a:], X[a:b], X[a:].T, beta=beta, alpha=alpha)
        out[b:, a:b] = out[a:b, b:].T
    return out


def _symmetric_gram(X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    out = X.new_empty(X.shape[:-1] + X.shape[-2:-1]) if out is None else out
    for x, o in zip(X, out):
        symmetric_matmul(x, o)
    return out


def _symmetric_poly(A: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(A) if out is None else out
    for a, o in zip(A, out):  # A·A = A·Aᵀ: A is symmetric
        symmetric_matmul(a, o, a, beta=b, alpha=c)
    return out


# The CPU products for matrices of at least CPU_SYMMETRIC_MIN_ROWS rows (one matrix per call).
SYMMETRIC_OPS = MATMUL_OPS._replace(gram=_symmetric_gram, poly=_symmetric_poly)


def matmul_ops(device: torch.device, m: int, outputs: recurrence.Outputs | None = None) -> recurrence.MatmulOps:
    """The products for an m-row bucket on ``device``: batched GEMMs, or on a CPU from
    CPU_SYMMETRIC_MIN_ROWS rows the symmetric ones; into ``outputs`` where given."""
    ops = recurrence.batched_gemm_ops(outputs)
    if device.type != "cpu" or m < CPU_SYMMETRIC_MIN_ROWS:
        return ops
    if outputs is None:
        return SYMMETRIC_OPS
    return ops._replace(gram=lambda X: _symmetric_gram(X, outputs.gram(X)),
                        poly=lambda A, b, c: _symmetric_poly(A, b, c, outputs.poly(A)))


def orthogonalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype, path: str | None = None,
                  consume: bool = False) -> torch.Tensor:
    """Newton–Schulz on a (k, m, n) stack with m <= n; returns (k, m, n) in ``ns_dtype``. The
    algorithm (standard or Gram) and normalization (Frobenius or AOL) are the config's; this
    backend has one path. The standard schedule writes into one set of buffers (``recurrence.Outputs``,
    the normalized copy among them: ``recurrence.run_owned``). ``consume``: the caller gives the
    stack up; normalization scales an fp32 stack in place, and the products' second m×n buffer lies
    in its memory where X does not."""
    # A traced step leaves buffers to the compiler (whose functionalization of writes through a
    # dtype-reinterpreted view of the stack gave wrong results), and a functional or fake tensor has
    # no memory to lend: only a plain tensor in eager execution is consumed.
    consume = consume and type(stack) is torch.Tensor and not torch.compiler.is_compiling()
    X = normalize(stack, config, ns_dtype, consume)
    # X is the stack itself where normalization scaled it in place and kept its dtype.
    second = workspace.reinterpret(stack, ns_dtype, tuple(X.shape)) if consume and X is not stack else None
    return recurrence.run_owned(X, config, ns_dtype, functools.partial(matmul_ops, stack.device, stack.shape[-2]),
                                second)


def apply_update(bucket: Bucket, ortho: torch.Tensor, groups: list[dict], state=None) -> None:
    """W *= 1 - lr·wd; W -= lr·scale·O — for every parameter of the bucket, foreach per (group, scale).
    On a CPU, O is added in its own dtype instead of converting the whole stack first: where O is
    the narrower (bf16 O, fp32 parameters) the bits are those of converting first (widening is
    exact); where it is the wider (fp32 O from ns_dtype=fp32, bf16 parameters) add_ computes in fp32
    and rounds once, where a GPU, which converts O first, rounds twice (1 ulp apart in ~2% of the
    elements; torch.optim.Muon's O is bf16, so it has neither case). A bucket with a
    variant (NorMuon, hyperball; ``state`` holds theirs) first turns O into O_eff = g·s⊙O
    (muon_kernels/variants.py), and the hyperball then rescales each matrix by its c."""
    shrink = None
    if bucket.variant.active:
        ortho, shrink = variant_update(bucket, ortho, groups, state)
    if bucket.device.type != "cpu" or shrink is not None:
        ortho = ortho.to(bucket.entries[0].param.dtype)
    batches: dict[tuple[int, float], tuple[list, list]] = defaultdict(lambda: ([], []))
    # On a CPU a tall matrix's update is first copied out of its transposed stack slot into a
    # contiguous buffer, one matrix at a time: reading the transposed view inside add_ ran 1.5–2×
    # slower than that copy plus a contiguous add_ (bench/README.md, CPU strategy).
    unslot = [bucket.device.type == "cpu" and bucket.transposed_in_stack(e) and e.view.batch == 1
              and e.target.ndim == 2 for e in bucket.entries]
    if any(unslot):
        buf = bucket.scratch("update", (max(e.target.numel() for e, u in zip(bucket.entries, unslot) if u),),
                            ortho.dtype)
    for i, (e, from_slot) in enumerate(zip(bucket.entries, unslot)):
        gi = e.group
        if from_slot:
            start = bucket.offsets()[i]
            u = transpose_into(buf[: e.target.numel()].view(e.target.shape), ortho[start])
            decay_and_add([e.target], [u], lr=groups[gi]["lr"], weight_decay=groups[gi]["weight_decay"],
                          scale=e.scale, cautious=bucket.cautious)
            continue
        params, outs = batches[(gi, e.scale)]
        params.append(e.target)
        outs.append(bucket.slot(ortho, i, copy=True))
    for (gi, scale), (params, outs) in batches.items():
        decay_and_add(params, outs, lr=groups[gi]["lr"], weight_decay=groups[gi]["weight_decay"], scale=scale,
                      cautious=bucket.cautious)
    if shrink is not None:  # hyperball: back onto each matrix's sphere
        offset = 0
        for e in bucket.entries:
            e.target.mul_(shrink[offset: offset + e.view.batch].view(-1, *[1] * (e.param.ndim - 1)))
            offset += e.view.batch


def variant_update(bucket: Bucket, ortho: torch.Tensor, groups: list[dict], state):
    """(O_eff as fp32 (K, m, n), hyperball factors c or None), NorMuon's v updated in place."""
    vs, radii = variants.state_tensors(bucket, state)
    scales, sums = variants.torch_statistics(bucket, ortho, vs)
    alphas = update_scalars(bucket, groups)[0] if bucket.variant.hyperball else None
    g, shrink = variants.gains(bucket, sums, alphas, radii)
    return variants.effective_update(bucket, ortho, scales, g), shrink


def _scalar(value: float, tensors: list[torch.Tensor]):
    """A scalar that multiplies in fp32 or in the tensors' precision, whichever is wider. For 16-bit
    tensors on CPU a 0-dim fp32 tensor, because torch 2.13's CPU ``_foreach_mul_`` first rounds a
    Python scalar to the tensors' dtype (a bf16 decay of 0.998 became 0.996, doubling it);
    otherwise the Python float: fp32 and fp64 tensors apply it at their own precision (an fp64
    decay of 1 - 1e-8 must not round to 1), and on a GPU it needs no host-to-device copy (so a
    CUDA-graph capture can contain it)."""
    if tensors[0].device.type == "cpu" and tensors[0].dtype.itemsize < 4:
        return torch.tensor(value, dtype=torch.float32)
    return value


def decay_and_add(params: list[torch.Tensor], outs: list[torch.Tensor], *, lr, weight_decay: float,
                  scale: float, cautious: bool = False) -> None:
    """``W *= 1 - lr·wd; W -= lr·scale·O`` for lists of same-device tensors (whole or shards).
    ``lr`` is a float or a 1-element tensor; a tensor on the parameters' device is used there,
    without reading it back to the host (CUDA-graph capturable). ``cautious``: the decay applies
    only where W·O >= 0 (signs agree, or either is zero; O taken in W's dtype), elsewhere W keeps
    its value."""
    device = params[0].device
    acc = torch.promote_types(params[0].dtype, torch.float32)  # fp32 for 16-bit and fp32 parameters, fp64 for fp64 ones
    tensor_lr = isinstance(lr, torch.Tensor)
    if tensor_lr:
        lr = lr.to(device=device, dtype=acc).reshape(())
    decay = 1.0 - lr * weight_decay
    # The scaled update is made before the first write to a parameter (as torch.optim.Muon orders
    # it): an allocation that fails (an OOM, caught and retried) must not leave weights decayed
    # without their update, to be decayed again by the retry.
    steps = torch._foreach_mul([o if o.dtype == p.dtype else o.to(p.dtype) for o, p in zip(outs, params)],
                               -lr * scale) if tensor_lr else None
    if weight_decay != 0.0 and cautious:
        # One factor tensor per parameter, made as it goes (all of them first would hold a second
        # copy of the bucket), so each parameter is decayed and updated before the next factor is
        # allocated: a failing allocation leaves whole steps behind it, never a lone decay. An
        # update narrower than its weight (a bf16 O for fp32 W, a CPU's default) is widened first,
        # exactly, rather than inside the add after the decay; a wider one (fp32 O for 16-bit W)
        # stays as it is: rounding it first would change the add's bits.
        # Device scalars made by fill kernels: no host-to-device copy, so capturable.
        decay = decay if tensor_lr else torch.full((), decay, dtype=acc, device=device)
        one = torch.ones((), dtype=acc, device=device)
        for i, (p, o) in enumerate(zip(params, outs)):
            if o.dtype.itemsize < p.dtype.itemsize:
                o = o.to(p.dtype)
            factor = torch.where(_signs_agree(p, o if o.dtype == p.dtype else o.to(p.dtype)), decay, one)
            p.mul_(factor)
            if tensor_lr:
                torch._foreach_add_([p], [steps[i]])
            else:
                torch._foreach_add_([p], [o], alpha=-lr * scale)
        return
    if tensor_lr and weight_decay != 0.0:
        torch._foreach_mul_(params, decay)
    elif not tensor_lr and decay != 1.0:
        torch._foreach_mul_(params, _scalar(decay, params))
    if tensor_lr:
        torch._foreach_add_(params, steps)
    else:
        torch._foreach_add_(params, outs, alpha=-lr * scale)


def _signs_agree(w: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """W·O >= 0 elementwise, as W·sign(O) >= 0: a product by ±1 or 0 is exact (W·O of tiny values
    would underflow to 0), true where the signs agree or either is zero — the kernels' decision for
    every finite W and O — in three passes over memory where comparing the signs and the zeros took
    seven. Non-finite values may decide otherwise (±inf·0 and a NaN in O); W is inf or NaN there
    either way."""
    return torch.mul(w, o.sign()) >= 0
