"""The CUDA C++ backend (``muon_kernels._C``) on a real GPU (marked ``gpu``; skipped without one).

Every test runs twice: on the device's native code path and with ``MUON_KERNELS_CUDA_PATH=sm75``
(fp16 mma, no cp.async — the Turing path, exercised on the GPUs we can get). Oracles: the fp64
recurrence and matmuls, torch's own error at the same precision (DESIGN.md §5), the scalar map, and
the torch backend for whole optimizer steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import available_backends, torch_backend
from muon_kernels.ns_config import resolve_ns_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from arrival_counters import check_streams_and_graph  # noqa: E402
from oracles import plain_recurrence, reference_ns, rel_err, scalar_map  # noqa: E402
from summation_order import serial_fma_matmul, symmetric_epilogue, update_epilogue  # noqa: E402

# Skipped only without a CUDA device. With one, an extension that cannot run there (not built, a
# driver older than the CUDA 13 runtime, no SASS for this arch) fails every test with the reason:
# a lent GPU must never come back with these tests silently skipped.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA_OK, CUDA_WHY = available_backends("cuda")["cuda"] if torch.cuda.is_available() else (False, "no CUDA device")
if CUDA_OK:
    from muon_kernels.backends import cuda_backend


@pytest.fixture(autouse=True)
def extension_runs_here():
    assert CUDA_OK, f"a CUDA device is present but the cuda backend cannot run on it: {CUDA_WHY}"


DEV = torch.device("cuda")
# Odd sizes (one row, primes, just past a 128 tile), tall and wide, a batch, one multi-tile square.
SHAPES = [(1, 1, 64), (3, 96, 200), (2, 257, 513), (1, 640, 640), (2, 130, 1000)]
KELLER = resolve_ns_config("keller", 5, 1e-7)
# Relative Frobenius error bounds for single matmul kernels against fp64: 2× what torch's own
# matmul at that precision makes on the same input, plus one rounding of the output. In fp32 the
# kernels accumulate each output in one serial FMA chain over K (csrc/gemm.cuh SimtGemm), whose
# error at long K exceeds cuBLAS's split-K order: at (1, 300, 700) 4.18e-7 against cuBLAS's 1.06e-7
# on an H200 (tests/summation_order.py reproduces the kernel's 4.182481158112e-07 exactly), so
# the fp32 yardstick is the larger of the two orders' errors, both measured on the same input.
OUTPUT_ROUNDING = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _reference_error(theirs_err: float, dtype, serial_out, exact) -> float:
    """torch's error at this precision, and in fp32 the serial-chain order's too: the larger."""
    return max(theirs_err, rel_err(serial_out().to(exact.device), exact)) if dtype == torch.float32 else theirs_err


@pytest.fixture(params=["native", "sm75"])
def path(request, monkeypatch):
    if request.param == "sm75":
        monkeypatch.setenv("MUON_KERNELS_CUDA_PATH", "sm75")
    else:
        monkeypatch.delenv("MUON_KERNELS_CUDA_PATH", raising=False)
    return request.param


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kernel_dtypes(path):
    # bf16 operands need the sm80 path; the sm75 path takes fp16 (and fp32 on the FMA units).
    return [torch.float32, torch.float16] + ([torch.bfloat16] if path == "native" and
                                             torch.cuda.get_device_capability()[0] >= 8 else [])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_newton_schulz_against_fp64(path, shape, ns_dtype):
    G = _randn(*shape)
    ref = reference_ns(G)
    out = cuda_backend.orthogonalize(G.float().to(DEV), KELLER, ns_dtype)
    assert out.dtype == ns_dtype and out.shape == G.shape
    out = out.cpu()
    if ns_dtype == torch.float32:
        assert rel_err(out, ref) <= 1e-4
    else:
        assert rel_err(out, ref) <= 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2


@pytest.mark.parametrize("algorithm", ["standard", "gram"])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_cublas_path_against_fp64(path, ns_dtype, algorithm):
    """The "cublas" path (the extension's normalization, cuBLAS's products, the sm75 path's fp16
    iteration for bf16): inside the same band as the kernels; Gram NS the same map."""
    G = _randn(2, 130, 500)
    ref = reference_ns(G)
    config = resolve_ns_config("keller", 5, 1e-7, algorithm)
    out = cuda_backend.orthogonalize(G.float().to(DEV), config, ns_dtype, path="cublas")
    assert out.dtype == ns_dtype and out.shape == G.shape
    bound = 1e-4 if ns_dtype == torch.float32 else 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2
    if algorithm == "gram":  # the torch backend's Gram NS (the reference) at this precision is the yardstick
        bound = max(bound, 2 * rel_err(torch_backend.orthogonalize(G.float().to(DEV), config, ns_dtype).cpu(), ref))
    assert rel_err(out.cpu(), ref) <= bound


@pytest.mark.parametrize("preset", ["keller", "quintic", "polar_express"])
def test_scalar_map(path, preset):
    D, expected = scalar_map(preset)
    out = cuda_backend.orthogonalize(D[None].to(DEV), resolve_ns_config(preset, 5, 1e-7), torch.float32)[0].cpu()
    torch.testing.assert_close(out.diagonal().double(), expected, rtol=0, atol=1e-4)
    assert torch.count_nonzero(out - torch.diag(out.diagonal())) == 0


def test_strided_input_and_zero_steps_normalize_like_torch(path):
    G = _randn(2, 300, 130).float().to(DEV)
    config = resolve_ns_config("polar_express", 0, 1e-7)
    for stack in (G, G.mT):  # contiguous, and a transposed view read through its strides
        ours = cuda_backend.orthogonalize(stack, config, torch.float32)
        torch.testing.assert_close(ours, torch_backend.normalize(stack, config, torch.float32), rtol=1e-6, atol=0)


def test_shard_buckets_of_a_rank_without_rows_and_of_one_with_them(path):
    """FSDP2 shard buckets of a 1×24 matrix over two ranks, stepped by the extension's backend: rank 1
    holds no rows (the torch path: the extension refuses an empty view) and steps without error,
    rank 0's row goes through the kernels; each equal to the torch backend on the same shard."""
    from muon_kernels import distributed
    from muon_kernels.bucket import Bucket, Entry, MatrixView

    groups = [{"momentum": 0.95, "lr": 0.02, "weight_decay": 0.1}]
    start, grad = torch.randn(1, 24, device=DEV), torch.randn(1, 24, device=DEV)
    for rank in (1, 0):
        results = []
        for backend in (cuda_backend, torch_backend):
            p, buf = start.clone(), torch.ones(1, 24, device=DEV)
            bucket = Bucket(device=DEV, dtype=torch.float32, m=1, n=24, config=None, ns_dtype=torch.float32,
                            nesterov=True, momentum_form="ema", backend=backend, why="",
                            entries=[Entry(group=0, param=p, view=MatrixView(1, 1, 24, "2d"), scale=1.0)])
            shard = distributed.shard_bucket(bucket, 2, rank)
            [e] = shard.entries
            stack = backend.momentum_stack(shard, [e.piece(grad)], [e.piece(buf)], groups, {})
            backend.apply_update(shard, stack, groups, {})
            results.append((stack, buf, p))
        assert results[0][0].numel() == (0 if rank else 24)
        for ours, theirs in zip(*results):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_symmetric_matmul_of_no_columns_is_beta_d(path, monkeypatch):
    """x of shape (k, m, 0): x·xᵀ is zero, so the result is beta·d (zero without d), written over the
    work buffer (NaN-filled here), never its previous contents."""
    monkeypatch.setenv("MUON_KERNELS_DEBUG_FILL", "nan")
    X = torch.empty(2, 5, 0, device=DEV)
    D = torch.randn(2, 5, 5, device=DEV)
    assert torch.equal(cuda_backend.symmetric_matmul(X, alpha=0.5, d=D, beta=1.5), D * 1.5)
    assert torch.equal(cuda_backend.symmetric_matmul(X, alpha=0.5), torch.zeros(2, 5, 5, device=DEV))


@pytest.mark.parametrize("shape", [(2, 100, 37), (1, 300, 700), (3, 256, 256)])
def test_symmetric_matmul_kernel(path, shape):
    for dtype in _kernel_dtypes(path):
        X = _randn(*shape).to(DEV, dtype)
        D = _randn(shape[0], shape[1], shape[1], seed=1)
        D = (D + D.mT).to(DEV, dtype)
        ours = cuda_backend.symmetric_matmul(X, alpha=-0.7, d=D, beta=1.3)
        exact = -0.7 * X.double() @ X.double().mT + 1.3 * D.double()
        theirs = torch.baddbmm(D, X, X.mT, alpha=-0.7, beta=1.3)
        serial = lambda: symmetric_epilogue(serial_fma_matmul(X, X.mT), -0.7, D, 1.3)  # noqa: E731
        reference = _reference_error(rel_err(theirs, exact), dtype, serial, exact)
        assert rel_err(ours, exact) <= 2 * reference + OUTPUT_ROUNDING[dtype], dtype
        assert torch.equal(ours, ours.mT), f"{dtype}: mirrored tiles must make the result exactly symmetric"


@pytest.mark.parametrize("count", [2, 3, 7])
def test_split_symmetric_matmul(path, monkeypatch, count):
    """Split-K (forced here; the rule splits only products with few tiles): the same accuracy band,
    exactly symmetric, and the same bits on every call (slices summed in a fixed order)."""
    monkeypatch.setattr(cuda_backend, "splits", lambda batch, m, k, dtype, device: count)
    for dtype in _kernel_dtypes(path):
        X = _randn(2, 200, 1000).to(DEV, dtype)  # k pads to 1024: 32 K steps of 32 (fp32: 128 of 8)
        D = _randn(2, 200, 200, seed=1)
        D = (D + D.mT).to(DEV, dtype)
        ours = cuda_backend.symmetric_matmul(X, alpha=-0.7, d=D, beta=1.3)
        assert torch.equal(ours, cuda_backend.symmetric_matmul(X, alpha=-0.7, d=D, beta=1.3)), dtype
        exact = -0.7 * X.double() @ X.double().mT + 1.3 * D.double()
        theirs = torch.baddbmm(D, X, X.mT, alpha=-0.7, beta=1.3)
        serial = lambda: symmetric_epilogue(serial_fma_matmul(X, X.mT), -0.7, D, 1.3)  # noqa: E731
        reference = _reference_error(rel_err(theirs, exact), dtype, serial, exact)
        assert rel_err(ours, exact) <= 2 * reference + OUTPUT_ROUNDING[dtype], dtype
        assert torch.equal(ours, ours.mT), dtype


def test_split_reduces_in_its_launch_on_streams_and_in_graphs(path, monkeypatch):
    """The last slice of each tile sums the partials in the same launch, at per-stream arrival
    counters (workspace.COUNTERS, shared with the Triton kernels) that every launch leaves at zero:
    the same bits on two streams at once and in a replayed CUDA graph (which takes fresh counters
    at capture, none kept) as eagerly, and every kept counter back at zero."""
    monkeypatch.setattr(cuda_backend, "splits", lambda batch, m, k, dtype, device: 5)
    for dtype in _kernel_dtypes(path):
        Xs = [_randn(3, 300, 1000, seed=s).to(DEV, dtype) for s in (4, 5)]
        eager = [cuda_backend.symmetric_matmul(X, alpha=0.5) for X in Xs]
        check_streams_and_graph(lambda x: cuda_backend.symmetric_matmul(x, alpha=0.5), Xs, eager)


def test_split_newton_schulz_driver(path, monkeypatch):
    """The C++ driver with both symmetric products split: inside the same band against fp64."""
    G = _randn(1, 256, 2000)
    ref = reference_ns(G)
    monkeypatch.setattr(cuda_backend, "splits", lambda batch, m, k, dtype, device: 4)
    for ns_dtype in (torch.float32, torch.bfloat16):
        out = cuda_backend.orthogonalize(G.float().to(DEV), KELLER, ns_dtype).cpu()
        bound = 1e-4 if ns_dtype == torch.float32 else 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2
        assert rel_err(out, ref) <= bound, ns_dtype


@pytest.mark.parametrize("shape", [(2, 100, 37), (1, 300, 700), (3, 256, 256)])
def test_ns_update_kernel(path, shape):
    k, m, n = shape
    for dtype in _kernel_dtypes(path):
        X = _randn(k, m, n).to(DEV, dtype)
        B = (_randn(k, m, m, seed=1) / m**0.5).to(DEV, dtype)
        ours = cuda_backend.ns_update(B, X, 2.5)
        exact = 2.5 * X.double() + B.double() @ X.double()
        theirs = torch.baddbmm(X, B, X, beta=2.5)
        serial = lambda: update_epilogue(serial_fma_matmul(B, X), 2.5, X)  # noqa: E731
        reference = _reference_error(rel_err(theirs, exact), dtype, serial, exact)
        assert rel_err(ours, exact) <= 2 * reference + OUTPUT_ROUNDING[dtype], dtype


def test_nan_member_does_not_leak(path):
    G = _randn(4, 200, 300).float().to(DEV)
    clean = cuda_backend.orthogonalize(G, KELLER, torch.bfloat16)
    G[2, 5, 5] = float("nan")
    out = cuda_backend.orthogonalize(G, KELLER, torch.bfloat16)
    assert torch.isnan(out[2]).all()
    assert torch.equal(out[[0, 1, 3]], clean[[0, 1, 3]])


def test_kernels_run_on_the_current_stream(path):
    """Input written on a side stream after a long spin: kernels on any other stream would read it
    before the write lands."""
    src = _randn(3, 200, 300).float().to(DEV)
    expected = cuda_backend.orthogonalize(src, KELLER, torch.bfloat16)
    x = torch.zeros_like(src)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        x.copy_(src)
        out = cuda_backend.orthogonalize(x, KELLER, torch.bfloat16)
    side.synchronize()
    assert torch.equal(out, expected)


def _params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) / s[-1] ** 0.5).to(DEV, dtype)) for s in shapes]


def _train(shapes, dtype, backend, steps=4, **kwargs):
    ps = _params(shapes, dtype)
    start = [p.detach().clone() for p in ps]
    opt = mk.Muon(ps, lr=0.05, weight_decay=0.1, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(DEV, dtype)
        opt.step()
    return ps, start, opt


# Wide, tall (transposed in the stack), square, a conv filter, a 3-wide stack of one shape, and a
# 2048² matrix whose 256 chunks fill a whole multi-tensor launch.
STEP_SHAPES = [(192, 64), (64, 192), (64, 64), (256, 64), (64, 256), (32, 16, 3, 3), (2048, 2048)] + [(96, 40)] * 3


def _displacement_error(ours, ref, start) -> float:
    """Largest ‖ours - ref‖ / ‖ref - start‖ over the parameters."""
    return max(((p.double() - q.double()).norm() / (q.double() - s.double()).norm()).item()
               for p, q, s in zip(ours, ref, start))


@pytest.mark.parametrize("dtype, ns_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_step_matches_torch_backend(path, dtype, ns_dtype, nesterov):
    ours, start, opt = _train(STEP_SHAPES, dtype, "cuda", ns_dtype=ns_dtype, nesterov=nesterov)
    ref, _, ref_opt = _train(STEP_SHAPES, dtype, "torch", ns_dtype=ns_dtype, nesterov=nesterov)
    assert {row.backend for row in opt.plan()} == {"cuda"}
    if ns_dtype == torch.float32:
        bound = 1e-4  # of each parameter's displacement
    else:
        # A 16-bit iteration's trajectory is chaotic (a 1e-7 gradient change moves it by percents):
        # 2× the distance between torch's own 16-bit and fp32 runs of the same training, + 1e-2.
        ref32, _, _ = _train(STEP_SHAPES, dtype, "torch", ns_dtype=torch.float32, nesterov=nesterov)
        bound = 2 * _displacement_error(ref, ref32, start) + 1e-2
    assert _displacement_error(ours, ref, start) <= bound
    # Momentum buffers depend on the gradients only, and the fused kernel rounds like torch's
    # foreach ops: equal up to a last-bit difference from contraction.
    eps = torch.finfo(dtype).eps
    for p, q in zip(ours, ref):
        m_ours, m_ref = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        torch.testing.assert_close(m_ours, m_ref, rtol=2 * eps, atol=2 * eps * m_ref.abs().max().item())


def test_many_tensors_span_several_multi_tensor_launches(path):
    """70 parameters (> 32 per launch) of one shape in one bucket, fused momentum and update
    against the torch backend, fp32 throughout."""
    shapes = [(300, 200)] * 70
    ours, start, _ = _train(shapes, torch.float32, "cuda", steps=2, ns_dtype=torch.float32)
    ref, _, _ = _train(shapes, torch.float32, "torch", steps=2, ns_dtype=torch.float32)
    assert _displacement_error(ours, ref, start) <= 1e-4
