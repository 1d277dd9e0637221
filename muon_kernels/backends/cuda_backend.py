"""CUDA C++ backend: the hand-written kernels of the compiled extension ``muon_kernels._C``.

For GPUs Triton does not serve (Turing sm_75, or no working Triton) and as a second opinion on
the Triton kernels elsewhere. Per bucket: one fused momentum → Nesterov → stack launch per 32
tensors; Newton–Schulz as 3 normalization launches then 3 per step (symmetric X·Xᵀ and
b·A + c·A·A on tensor cores, upper-triangle tiles, mirrored store, each split along K when it has
too few tiles to fill the GPU, the slices summed in a fixed order by the last to arrive, in the
same launch; a·X + B·X); one fused
decay-and-update launch per 32 tensors. The extension is torch-free: this module hands it data
pointers, sizes, dtype codes and the current stream, and allocates every buffer with torch (so
the caching allocator and stream order apply).

Both tensor-core paths run ldmatrix + mma.sync on XOR-swizzled shared tiles (csrc/tile_layout.h),
128×128 blocks of four 64×64 warp tiles, two blocks per SM. Code paths: ``sm80`` (compute
capability 8.0+: bf16 or fp16 mma, cp.async 3-stage pipeline) and ``sm75`` (fp16 mma, plain
loads, 2 stages; a bf16 iteration runs in fp16 after normalization,
safe because normalized values lie in [-1, 1]). ``MUON_KERNELS_CUDA_PATH=sm75`` forces the sm75
path on newer GPUs so the oldest path can be tested on the GPUs we can get. fp32 iterations run
on the FMA units (ieee fp32, like the torch reference).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .. import _C, momentum_precision, recurrence, variants, workspace
from ..triton_kernels.config import sm_count, split_factor
from ..bucket import Bucket
from ..environment import Switch
from ..ns_config import NSConfig
from . import torch_backend
from ..scalars import momenta, update_scalars
from .fused import fusable, row_stride, same_layout

NAME = "cuda"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ALL = tuple(DTYPE_CODES)
PATH_ENV = "MUON_KERNELS_CUDA_PATH"
SM75, SM80 = 75, 80
_PATH = Switch(PATH_ENV)


def code_path(device: torch.device) -> int:
    """The tensor-core code path for ``device``: ``sm80`` from compute capability 8.0, else ``sm75``;
    ``MUON_KERNELS_CUDA_PATH=sm75`` forces the sm75 path."""
    forced = _PATH.get().strip().lower()
    if forced not in ("", "native", "sm75"):
        raise ValueError(f"{PATH_ENV}={forced!r} is not a code path: set it to 'sm75' (force the Turing path: fp16 "
                         "mma, no cp.async) or 'native', or unset it")
    if forced == "sm75":
        return SM75
    return SM80 if torch.cuda.get_device_capability(device)[0] >= 8 else SM75


def work_dtype(ns_dtype: torch.dtype, path: int) -> torch.dtype:
    """The dtype the iteration runs in: ``ns_dtype``, except fp16 for bf16 on the sm75 path."""
    return torch.float16 if path == SM75 and ns_dtype == torch.bfloat16 else ns_dtype


def paths(m: int, n: int, ns_dtype: torch.dtype, device: torch.device, config: NSConfig | None = None) -> tuple[str, ...]:
    """The extension's own kernels (the code path follows the compute capability), then, on a GPU,
    "cublas" for the measuring mode to time: the normalization kernels, then cuBLAS's batched GEMMs
    (the Triton backend's path of that name, for GPUs without Triton)."""
    return (kernel_path(m, n, ns_dtype, device, config)[0],) + (("cublas",) if device.type == "cuda" else ())


def kernel_path(m: int, n: int, ns_dtype: torch.dtype, device: torch.device,
                config: NSConfig | None = None, path: str | None = None) -> tuple[str, str]:
    if path == "cublas":
        return "cublas", ("normalization kernels (3 launches), then cuBLAS's batched GEMMs in the iteration dtype; "
                          "fused momentum and update")
    path, how = _kernel_path(m, n, ns_dtype, device)
    if config is None or config.plain:  # the C++ driver, one call
        return path, how
    what = "Gram NS" if config.algorithm == "gram" else "AOL-preconditioned NS"
    return f"{path}-ops", f"{what} on the same kernels, one launch per product on zero-padded buffers; {how}"


def _kernel_path(m: int, n: int, ns_dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    if ns_dtype == torch.float32:
        return "simt", "fp32 (ieee) on the FMA units, 128×128 tiles; upper-triangle X·Xᵀ and A·A, mirrored store"
    path = code_path(device) if device.type == "cuda" and torch.cuda.is_available() else SM80
    if path == SM80:
        return "sm80", (f"{_name(ns_dtype)} ldmatrix + mma.sync tensor cores, cp.async 3-stage pipeline; upper-triangle "
                        "tiles, mirrored store, split-K below two waves of tiles; fused momentum and update; "
                        "5 + 3·steps launches (+1 per split product)")
    return "sm75", ("fp16 mma.sync tensor cores (bf16 iterates in fp16 after normalization), register-staged "
                    "double buffering; upper-triangle tiles, mirrored store, split-K below two waves of tiles; "
                    "5 + 3·steps launches (+1 per split product)")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def padded(size: int) -> int:
    """The size of a work-buffer dimension: the next multiple of the extension's tile padding."""
    return -(-size // _C.PAD) * _C.PAD


def _require(*specs) -> None:
    """Raise a ValueError naming the first tensor the kernels cannot take; each spec is
    ``(tensor, name, dtypes, contiguous)``. Dtypes are checked for all, then layout, then device,
    all before anything is launched."""
    for t, name, dtypes, _ in specs:
        if t.dtype not in dtypes:
            raise ValueError(f"cuda backend: {name} has dtype {_name(t.dtype)}; its kernels take "
                             f"{', '.join(_name(d) for d in dtypes)} here (use backend='torch' for other dtypes)")
    for t, name, _, contiguous in specs:
        if contiguous and not t.is_contiguous():
            raise ValueError(f"cuda backend: {name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                             "pass t.contiguous() (the kernels address it as dense row-major memory)")
    for t, name, _, _ in specs:
        if t.device.type != "cuda":
            raise ValueError(f"cuda backend: {name} is on {t.device}; the extension's kernels need CUDA tensors")


# The extension's GEMM tiles: 128×128 outputs; K steps of 32 on tensor cores, 8 for fp32 on the FMA
# units (csrc/common.cuh TensorCoreTiles, SimtTiles). One step of either is a few tenths of a µs of
# an SM's time, the unit of the split cost model.
TILE = 128
K_STEP = {torch.float32: 8, torch.float16: 32, torch.bfloat16: 32}


def splits(batch: int, m: int, k: int, dtype: torch.dtype, device: torch.device) -> int:
    """K slices of a symmetric product of padded (batch, m, k) ``dtype`` operands on ``device``: the
    Triton kernels' fixed rule (``config.split_factor``: split only below two waves of output
    tiles), on this extension's tiles and K steps and the device's SM count."""
    t = m // TILE
    return split_factor(batch * t * (t + 1) // 2, k // K_STEP[dtype], sm_count(device))


def _split_workspace(batch: int, m: int, count: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fp32 slices of a product split ``count`` ways and the arrival counters its last slices
    reduce at (the Triton kernels' per-stream zeros, ``workspace.COUNTERS``); None when unsplit."""
    elements = _C.split_partial_elements(batch, m, count)
    if not elements:
        return None
    t = m // TILE
    return (workspace.empty((elements,), dtype=torch.float32, device=device),
            workspace.COUNTERS.get(device, batch * t * (t + 1) // 2))


@contextlib.contextmanager
def _split_launch(split: tuple[torch.Tensor, torch.Tensor] | None):
    """The addresses of ``split`` (zeros when unsplit) for the extension's launch; a launch that raises
    drops its counters (some may not be back at zero)."""
    try:
        yield {"split_partial": split[0].data_ptr(), "split_counters": split[1].data_ptr()} if split else {}
    except BaseException:
        if split:
            workspace.COUNTERS.forget(split[1])
        raise


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _zero_padded(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (k, rows, cols) copy of x with zeros around it (the kernels' padding contract)."""
    out = torch.zeros((x.shape[0], rows, cols), dtype=x.dtype, device=x.device)
    out[:, : x.shape[1], : x.shape[2]] = x
    return out


def symmetric_matmul(x: torch.Tensor, *, alpha: float = 1.0, d: torch.Tensor | None = None,
                     beta: float = 0.0) -> torch.Tensor:
    """``alpha·x·xᵀ + beta·d`` for a (k, m, n) stack (d: (k, m, m), symmetric), with the extension's
    symmetric kernel on zero-padded copies; returns (k, m, m) in x's dtype."""
    _require((x, "x", ALL, True), *([(d, "d", (x.dtype,), True)] if d is not None else []))
    if d is not None:
        if d.shape != (x.shape[0], x.shape[1], x.shape[1]):
            raise ValueError(f"cuda backend: d must have shape {(x.shape[0], x.shape[1], x.shape[1])}, "
                             f"got {tuple(d.shape)}")
    k, m, n = x.shape
    out = workspace.empty((k, padded(m), padded(m)), dtype=x.dtype, device=x.device)
    if x.numel() == 0:  # no columns: x·xᵀ is zero (no rows or matrices: the result is empty)
        result = out[:, :m, :m]
        return result.zero_() if d is None or beta == 0 else torch.mul(d, beta, out=result)
    xp = _zero_padded(x, padded(m), padded(n))
    dp = _zero_padded(d, padded(m), padded(m)) if d is not None else None
    with torch.cuda.device(x.device):
        _symmetric(xp, dp, out, alpha, beta, code_path(x.device))
    return out[:, :m, :m]


def _symmetric(x: torch.Tensor, d: torch.Tensor | None, out: torch.Tensor, alpha: float, beta: float,
               path: int) -> None:
    """out = alpha·x·xᵀ + beta·d on padded stacks, split along K when the product has few tiles."""
    k, mp, kp = x.shape
    count = splits(k, mp, kp, x.dtype, x.device)
    with _split_launch(_split_workspace(k, mp, count, x.device)) as split:
        _C.symmetric_matmul(p=x.data_ptr(), d=d.data_ptr() if d is not None else 0, c=out.data_ptr(),
                            dtype=DTYPE_CODES[x.dtype], batch=k, m=mp, k=kp, alpha=float(alpha), beta=float(beta),
                            path=path, stream=_stream(x.device), splits=count, **split)


def ns_update(b: torch.Tensor, x: torch.Tensor, a: float) -> torch.Tensor:
    """``a·x + b·x`` for b (k, m, m) and x (k, m, n) with the extension's kernel; returns (k, m, n)."""
    _require((x, "x", ALL, True), (b, "b", (x.dtype,), True))
    k, m, n = x.shape
    if b.shape != (k, m, m):
        raise ValueError(f"cuda backend: b must have shape {(k, m, m)}, got {tuple(b.shape)}")
    out = workspace.empty((k, m, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    xp, bp = _zero_padded(x, padded(m), padded(n)), _zero_padded(b, padded(m), padded(m))
    with torch.cuda.device(x.device):
        _C.ns_update(b=bp.data_ptr(), x=xp.data_ptr(), out=out.data_ptr(), dtype=DTYPE_CODES[x.dtype],
                     out_dtype=DTYPE_CODES[x.dtype], batch=k, m=padded(m), n=padded(n), out_rows=m, out_cols=n,
                     a=float(a), path=code_path(x.device), stream=_stream(x.device))
    return out


def _norm_workspace(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k, m, n = stack.shape
    tiles = -(-m // _C.NORM_TILE[0]) * -(-n // _C.NORM_TILE[1])
    return (workspace.empty((k, 2, tiles), dtype=torch.float32, device=stack.device),
            workspace.empty((k, 2), dtype=torch.float32, device=stack.device))


def _padded_ops(dtype: torch.dtype, path: int, device: torch.device) -> recurrence.MatmulOps:
    """The recurrence's three products on zero-padded (k, 128·i, 128·j) stacks, padding kept zero
    (every product of zero rows/columns is zero), with the extension's kernels on the current stream."""
    code, stream = DTYPE_CODES[dtype], _stream(device)

    def gram(x):
        k, mp, _ = x.shape
        out = workspace.empty((k, mp, mp), dtype=dtype, device=device)
        _symmetric(x, None, out, 1.0, 0.0, path)
        return out

    def poly(a, b, c):
        out = workspace.empty_like(a)
        _symmetric(a, a, out, c, b, path)
        return out

    def apply(b, x, a):
        k, mp, np_ = x.shape
        out = workspace.empty_like(x)
        _C.ns_update(b=b.data_ptr(), x=x.data_ptr(), out=out.data_ptr(), dtype=code, out_dtype=code, batch=k, m=mp,
                     n=np_, out_rows=mp, out_cols=np_, a=float(a), path=path, stream=stream)
        return out

    return recurrence.MatmulOps(gram, poly, apply)


def orthogonalize(stack: torch.Tensor, config: NSConfig, ns_dtype: torch.dtype, path: str | None = None,
                  consume: bool = False) -> torch.Tensor:
    """Newton–Schulz on a (k, m, n) stack with m <= n; returns a new (k, m, n) ``ns_dtype`` tensor
    (``consume``, the caller giving the stack up, changes nothing here: the work buffers are padded).
    ``stack`` may be any strided view (normalization reads it through its strides); an fp64 stack
    (fp64 parameters) is normalized by the torch backend, in fp64 (an fp32 copy would turn entries
    beyond fp32's range into inf, the matrix into NaN), and the kernels' own normalization is then
    the identity: X / max(0·‖X‖ + 1, floor) = X with floor = max(0, tiny) (``norm``; the recurrence
    keeps ``config``: AOL reads its floor).
    The standard recurrence runs in the C++ driver (one call); Gram NS and AOL run the recurrence
    module over ``_padded_ops``; ``path="cublas"`` runs it over cuBLAS's GEMMs on unpadded buffers."""
    norm = config  # the kernels' normalization
    if stack.dtype == torch.float64:
        stack = torch_backend.normalize(stack, config, torch.float32)
        norm = dataclasses.replace(config, norm_scale=0.0, norm_offset=1.0, eps=0.0)
    _require((stack, "stack", ALL, False))
    if ns_dtype not in DTYPE_CODES:
        raise ValueError(f"cuda backend: ns_dtype must be one of float32, float16, bfloat16, got {ns_dtype}")
    k, m, n = stack.shape
    out = workspace.empty((k, m, n), dtype=ns_dtype, device=stack.device)
    if out.numel() == 0:
        return out
    code = code_path(stack.device)
    work = work_dtype(ns_dtype, code)
    mp, np_ = padded(m), padded(n)
    if path == "cublas":
        x = _normalized(stack, norm, workspace.empty((k, m, n), dtype=work, device=stack.device))
        with torch.cuda.device(stack.device):
            return out.copy_(recurrence.run_owned(x, config, ns_dtype, recurrence.batched_gemm_ops))
    if not config.plain:  # Gram NS and AOL: the same kernels from Python, one launch per product
        return _orthogonalize_ops(stack, config, norm, ns_dtype, work, code, out)
    steps = config.steps
    x = workspace.empty((k, mp, np_) if steps else (0,), dtype=work, device=stack.device)
    y = workspace.empty_like(x)
    a = workspace.empty((k, mp, mp) if steps else (0,), dtype=work, device=stack.device)
    b = workspace.empty_like(a)
    partial, denom = _norm_workspace(stack)
    gram_splits, square_splits = splits(k, mp, np_, work, stack.device), splits(k, mp, mp, work, stack.device)
    with torch.cuda.device(stack.device), _split_launch(
            _split_workspace(k, mp, max(gram_splits, square_splits), stack.device)) as split:
        _C.newton_schulz(
            input=stack.data_ptr(), in_dtype=DTYPE_CODES[stack.dtype], in_strides=stack.stride(), batch=k, rows=m,
            cols=n, x=x.data_ptr(), y=y.data_ptr(), a=a.data_ptr(), b=b.data_ptr(), work_dtype=DTYPE_CODES[work],
            out=out.data_ptr(), out_dtype=DTYPE_CODES[ns_dtype], partial=partial.data_ptr(), denom=denom.data_ptr(),
            coefficients=[float(v) for step in config.coefficients for v in step], norm_scale=float(norm.norm_scale),
            norm_offset=float(norm.norm_offset), floor=float(norm.floor), path=code,
            stream=_stream(stack.device), gram_splits=gram_splits, square_splits=square_splits, **split,
        )
    return out


def _orthogonalize_ops(stack: torch.Tensor, config: NSConfig, norm: NSConfig, ns_dtype: torch.dtype,
                       work: torch.dtype, path: int, out: torch.Tensor) -> torch.Tensor:
    """Normalize (as ``norm`` says) into a zero-padded work buffer, run ``recurrence`` over
    ``_padded_ops``, copy the unpadded result into ``out``."""
    k, m, n = stack.shape
    x = _normalized(stack, norm, workspace.empty((k, padded(m), padded(n)), dtype=work, device=stack.device))
    with torch.cuda.device(stack.device):
        x = recurrence.run(x, config, ns_dtype, _padded_ops(work, path, stack.device))
    return out.copy_(x[:, :m, :n])


def _normalized(stack: torch.Tensor, config: NSConfig, x: torch.Tensor) -> torch.Tensor:
    """``x`` (k, rows ≥ m, cols ≥ n, the work dtype) holding the normalized stack, zeros around it."""
    k, m, n = stack.shape
    partial, denom = _norm_workspace(stack)
    with torch.cuda.device(stack.device):
        _C.normalize(input=stack.data_ptr(), in_dtype=DTYPE_CODES[stack.dtype], in_strides=stack.stride(), batch=k,
                     rows=m, cols=n, out=x.data_ptr(), out_dtype=DTYPE_CODES[x.dtype], out_rows=x.shape[1],
                     out_cols=x.shape[2], partial=partial.data_ptr(), denom=denom.data_ptr(),
                     norm_scale=float(config.norm_scale), norm_offset=float(config.norm_offset),
                     floor=float(config.floor), stream=_stream(stack.device))
    return x


def _layout(bucket: Bucket) -> dict:
    """Per tensor: numel, offset in the stack, matrix view and orientation; fixed for a plan."""
    if "cuda_layout" not in bucket.cache:
        numels = [e.view.numel for e in bucket.entries]
        bucket.cache["cuda_layout"] = dict(
            numels=numels, stack_offsets=[sum(numels[:i]) for i in range(len(numels))],
            rows=[e.view.rows for e in bucket.entries], cols=[e.view.cols for e in bucket.entries],
            transposed=[int(bucket.transposed_in_stack(e)) for e in bucket.entries],
            row_strides=[row_stride(e) for e in bucket.entries],
        )
    return bucket.cache["cuda_layout"]


def _variant_factors(bucket: Bucket, ortho: torch.Tensor, params, alphas: torch.Tensor, state) -> tuple[dict, tuple]:
    """One statistics launch (NorMuon's v updated in place), then the per-matrix scalars from the
    partial sums; returns the fused update's variant arguments (device pointers) and the tensors
    behind them, which the caller holds until the update is launched (freed before, their memory
    could be handed to another allocation, or unmapped without the caching allocator)."""
    v = bucket.variant
    vs, radii = variants.state_tensors(bucket, state)
    values = variants.statistics_table(bucket, params, vs)
    if bucket.cache.get("variant_table", (None,))[0] is not values:  # a new table: a tensor moved
        bucket.cache["variant_table"] = (values, torch.tensor(values, dtype=torch.int64).to(bucket.device))
    table = bucket.cache["variant_table"][1]
    k, m, n = ortho.shape
    row_scale = workspace.empty((k, n), dtype=torch.float32, device=bucket.device) if v.normuon else None
    partials = torch.empty((k, -(-n // _C.VARIANT_NEURONS), 4), dtype=torch.float32, device=bucket.device)
    _C.variant_statistics(ortho=ortho.data_ptr(), ortho_dtype=DTYPE_CODES[ortho.dtype],
                          param_dtype=DTYPE_CODES[params[0].dtype], table=table.data_ptr(), matrices=k, m=m, n=n,
                          row_scale=row_scale.data_ptr() if row_scale is not None else 0,
                          partials=partials.data_ptr(), weight=1.0 - v.beta2, eps=v.normuon_eps, normuon=v.normuon,
                          hyperball=v.hyperball, stream=_stream(bucket.device))
    gains, shrink = variants.gains(bucket, partials.sum(dim=1), alphas, radii)
    pointers = dict(neuron_cols=[int(variants.neurons(e.view)[1]) for e in bucket.entries],
                    row_scale=row_scale.data_ptr() if row_scale is not None else 0, gains=gains.data_ptr(),
                    shrink=shrink.data_ptr() if shrink is not None else 0, nmax=n)
    return pointers, (row_scale, gains, shrink)


def _empty_shard(bucket: Bucket) -> bool:
    """Whether an entry has no elements: an FSDP2 rank's shard of a matrix with fewer rows (or
    experts) than ranks. The extension's tables take no empty view (its checks refuse one, and a
    stack of only such entries has no memory to point at): the torch path steps that bucket."""
    return any(e.view.numel == 0 for e in bucket.entries)


def momentum_stack(bucket: Bucket, grads, bufs, groups: list[dict], state=None) -> torch.Tensor:
    """One launch per 32 tensors: momentum, Nesterov and the (transposing) copy into the stack."""
    if _empty_shard(bucket):
        return torch_backend.momentum_stack(bucket, grads, bufs, groups, state)
    buf_dtypes, grad_dtypes = {b.dtype for b in bufs}, {g.dtype for g in grads}
    low = bucket.low_precision
    if low.active:
        if (not (fusable(grads) and same_layout(bucket, grads) and same_layout(bucket, bufs))
                or len(grad_dtypes) != 1 or bucket.dtype != (grads[0].dtype if low.int8 else torch.bfloat16)
                or (low.int8 and not momentum_precision.kernel_blocks(bucket))
                or not momentum_precision.kernel_bits(bucket)):
            return torch_backend.momentum_stack(bucket, grads, bufs, groups, state)
        return _low_precision_stack(bucket, grads, bufs, groups, state)
    if (not (fusable(grads) and fusable(bufs) and same_layout(bucket, grads) and same_layout(bucket, bufs))
            or len(grad_dtypes) != 1 or buf_dtypes != {bucket.dtype}
            or bucket.dtype not in (grads[0].dtype, torch.float32)):
        return torch_backend.momentum_stack(bucket, grads, bufs, groups, state)
    stack = workspace.empty(bucket.stack_shape, dtype=bucket.dtype, device=bucket.device)
    with torch.cuda.device(bucket.device):
        _C.fused_momentum(
            grads=[g.data_ptr() for g in grads], bufs=[b.data_ptr() for b in bufs], **_layout(bucket),
            grad_dtype=DTYPE_CODES[grads[0].dtype], buf_dtype=DTYPE_CODES[bucket.dtype],
            momenta=momenta(bucket, groups).data_ptr(), stack=stack.data_ptr(), ema=bucket.momentum_form == "ema",
            nesterov=bucket.nesterov, stream=_stream(bucket.device),
        )
    return stack


def _low_precision_stack(bucket: Bucket, grads, bufs, groups: list[dict], state) -> torch.Tensor:
    """One launch per 32 tensors: int8 or stochastically rounded bf16 momentum, U into the stack."""
    low = bucket.low_precision
    scales, steps, seeds = momentum_precision.state_tensors(bucket, state)
    stack = workspace.empty(bucket.stack_shape, dtype=bucket.dtype, device=bucket.device)
    with torch.cuda.device(bucket.device):
        _C.low_precision_momentum(
            grads=[g.data_ptr() for g in grads], bufs=[b.data_ptr() for b in bufs], **_layout(bucket),
            grad_dtype=DTYPE_CODES[grads[0].dtype], momenta=momenta(bucket, groups).data_ptr(), stack=stack.data_ptr(),
            ema=bucket.momentum_form == "ema", nesterov=bucket.nesterov, int8=low.int8, stochastic=low.stochastic,
            scales=[s.data_ptr() for s in scales], steps=[s.data_ptr() for s in steps],
            seeds=seeds if low.stochastic else [], stream=_stream(bucket.device),
        )
    return stack


def apply_update(bucket: Bucket, ortho: torch.Tensor, groups: list[dict], state=None) -> None:
    """One launch per 32 tensors: W = W·(1 - lr·wd) - lr·scale·O for every parameter of the bucket
    (the decay only where W·O >= 0 with cautious weight decay)."""
    params = [e.target for e in bucket.entries]
    if (_empty_shard(bucket) or not fusable(params) or len({p.dtype for p in params}) != 1
            or ortho.dtype not in DTYPE_CODES):
        return torch_backend.apply_update(bucket, ortho, groups, state)
    ortho = ortho.contiguous()
    alphas, decays = update_scalars(bucket, groups)
    with torch.cuda.device(bucket.device):
        # ``held``: the tensors behind ``extra``'s pointers, alive until the launch is enqueued
        extra, held = _variant_factors(bucket, ortho, params, alphas, state) if bucket.variant.active else ({}, ())
        _C.fused_apply_update(
            params=[p.data_ptr() for p in params], **_layout(bucket), param_dtype=DTYPE_CODES[params[0].dtype],
            alphas=alphas.data_ptr(), decays=decays.data_ptr(), stack=ortho.data_ptr(),
            stack_dtype=DTYPE_CODES[ortho.dtype], cautious=bucket.cautious, stream=_stream(bucket.device), **extra,
        )
