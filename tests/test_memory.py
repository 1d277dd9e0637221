"""How much memory a step holds: Newton–Schulz keeps two m×n iterates (the normalized copy is one of
them), and the optimizer lets go of a bucket's buffers before the next bucket allocates its own.

Measured with ``step_memory.LiveTensors`` on a CPU: the torch backend for real, the Triton paths with
bench/launch_overhead.py's stand-in driver and launchers (the kernels are real JITFunctions that
launch nothing, so every buffer is allocated and freed exactly as on a GPU).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import muon_kernels as mk  # noqa: E402
from muon_kernels import recurrence  # noqa: E402
from muon_kernels.workspace import Scratch  # noqa: E402
from muon_kernels.backends import torch_backend  # noqa: E402
from muon_kernels.ns_config import resolve_ns_config  # noqa: E402
from step_memory import LiveTensors  # noqa: E402

KELLER = resolve_ns_config("keller", 5, 1e-7)
CONFIGS = {"standard": KELLER, "aol": resolve_ns_config("turbo", 4, 1e-7)}
K, M, N = 3, 64, 160


def _iterates_alive(fn, stack: torch.Tensor, ns_dtype: torch.dtype) -> int:
    """The most (k, m, n) tensors of the iteration dtype alive at once during ``fn(stack)``."""
    with LiveTensors() as live:
        out = fn(stack)
    assert out.shape == stack.shape and out.dtype == ns_dtype
    return live.peak_count[(tuple(stack.shape), ns_dtype)]


@pytest.mark.parametrize("normalization", CONFIGS)
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_torch_backend_holds_two_iterates(normalization, ns_dtype):
    """The normalized copy, then the products' two ping-pong buffers — one of which is that copy —
    and AOL's scaling into the same copy: two (k, m, n) iterates at most (fresh outputs held three,
    AOL with them four)."""
    cfg = CONFIGS[normalization]
    stack = torch.randn(K, M, N)
    fn = lambda s: torch_backend.orthogonalize(s, cfg, ns_dtype)  # noqa: E731
    assert _iterates_alive(fn, stack, ns_dtype) == 2


@pytest.mark.parametrize("normalization", CONFIGS)
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_reused_outputs_give_the_fresh_outputs_bits(normalization, ns_dtype):
    """``run_owned`` (products into one ``Outputs``, AOL in place) against ``run`` with a fresh
    tensor per product: bit for bit, standard and AOL, 16-bit and fp32 (an in-place multiply of a
    16-bit X by fp32 s rounds once, as the copy did)."""
    cfg = CONFIGS[normalization]
    X = torch_backend.normalize(torch.randn(K, M, N, generator=torch.Generator().manual_seed(3)), cfg, ns_dtype)
    fresh = recurrence.run(X.clone(), cfg, ns_dtype, recurrence.BATCHED_GEMM_OPS)
    reused = recurrence.run_owned(X.clone(), cfg, ns_dtype, recurrence.batched_gemm_ops)
    assert torch.equal(fresh, reused)


def test_gram_refuses_shared_outputs():
    """``recurrence.gram`` holds R, Q, Z and their products at once: ping-pong buffers would overwrite
    one of them, so it refuses such ops, and ``run_owned`` gives it fresh outputs."""
    cfg = replace(KELLER, algorithm="gram", restarts=(2,))
    X = torch_backend.normalize(torch.randn(2, 16, 48), cfg, torch.float32)
    with pytest.raises(ValueError, match="fresh outputs"):
        recurrence.gram(X, cfg.coefficients, (2,), recurrence.batched_gemm_ops(recurrence.Outputs(X.clone())))
    fresh = recurrence.run(X.clone(), cfg, torch.float32, recurrence.BATCHED_GEMM_OPS)
    assert torch.equal(recurrence.run_owned(X.clone(), cfg, torch.float32, recurrence.batched_gemm_ops), fresh)


def _shapes_step_peak(shapes, steps: int = 3) -> int:
    """Peak bytes allocated during the last of ``steps`` torch-backend steps over one matrix per shape
    (the earlier steps make the state, scratch and plan)."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = mk.Muon(params, lr=0.02, backend="torch")
    for i in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        if i < steps - 1:
            opt.step()
    assert len(opt._buckets) == len(shapes)
    with LiveTensors() as live:
        opt.step()
    return live.peak_bytes


@pytest.mark.parametrize("order", ["small first", "large first"])
def test_a_step_holds_one_bucket_at_a_time(order):
    """A bucket's stack and update are let go before the next bucket allocates: the step's peak is the
    largest single bucket's (the optimizer loop held the previous bucket's update through the next
    bucket's Newton–Schulz, and its stack while the next one was allocated)."""
    shapes = [(96, 160), (32, 48)] if order == "large first" else [(32, 48), (96, 160)]
    alone = max(_shapes_step_peak([s]) for s in shapes)
    assert _shapes_step_peak(shapes) == alone


# ------------------------------------------------------------- Triton paths (stand-in launchers)
@pytest.fixture
def stand_in():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the stand-in driver replaces compiled kernels: not under the interpreter")
    import launch_overhead

    with launch_overhead.stand_in() as calls:
        calls.recording = False
        yield


@pytest.mark.parametrize("path", ["symmetric", "cublas", "symmetric-cublas"])
@pytest.mark.parametrize("normalization", CONFIGS)
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("consume", [False, True])
def test_triton_paths_hold_two_iterates(stand_in, path, normalization, ns_dtype, consume):
    """Two (k, m, n) iterates, and one allocated where the caller gives its fp32 stack up (the other
    lies in the stack's memory: over it for an fp32 iteration, in its first half for a 16-bit one)."""
    from muon_kernels.triton_kernels import replay
    from muon_kernels.triton_kernels.ops import _NEWTON_SCHULZ

    cfg = CONFIGS[normalization]
    stack = torch.randn(K, M, N)
    with replay.replays(False):
        fn = lambda s: _NEWTON_SCHULZ[path](s, cfg, ns_dtype, consume=consume)  # noqa: E731
        assert _iterates_alive(fn, stack, ns_dtype) == (1 if consume else 2)


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_the_torch_backend_allocates_one_iterate_from_a_consumed_stack(ns_dtype):
    """fp32 stack: scaled in place (no fp32 copy), and the second m×n buffer in its memory."""
    stack = torch.randn(K, M, N)
    with LiveTensors() as live:
        torch_backend.orthogonalize(stack, KELLER, ns_dtype, consume=True)
    assert live.peak_count[((K, M, N), ns_dtype)] == 1
    assert live.peak_count[((K, M, N), torch.float32)] == (1 if ns_dtype == torch.float32 else 0)


def _capped_run(cap, steps: int = 3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 64)) for _ in range(5)] + [torch.nn.Parameter(torch.randn(64, 32))]
    opt = mk.Muon(params, lr=0.02, backend="torch", max_workspace_bytes=cap)
    g = torch.Generator().manual_seed(1)
    peak = 0
    for i in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        with LiveTensors() as live:
            opt.step()
        peak = live.peak_bytes if i else peak  # after the first step: state and scratch exist
    return opt, params, peak


def test_a_bucket_over_the_workspace_cap_is_planned_as_several():
    """``max_workspace_bytes`` bounds a bucket's whole working set, its stack included (which
    ``Bucket.chunks`` cannot: the momentum writes the stack whole): a local bucket over the cap is
    planned as consecutive buckets of whole entries, as even as they come. The steps are bit for bit
    those of one bucket, and hold less."""
    per_matrix = _capped_run(None, steps=1)[0]._buckets[0].matrix_bytes()
    capped, params, capped_peak = _capped_run(3 * per_matrix)
    whole, reference, whole_peak = _capped_run(None)
    assert [b.matrices for b in capped._buckets] == [3, 3] and [b.matrices for b in whole._buckets] == [6]
    assert all(torch.equal(p, q) for p, q in zip(params, reference))
    assert capped_peak < whole_peak
    assert str(capped.plan()).count("bucket of 3 matrices, iterated as 32×64") == 6
    # Uneven: 6 matrices at 4 per bucket are two buckets of 3, not 4 and 2.
    assert [b.matrices for b in _capped_run(4 * per_matrix, steps=1)[0]._buckets] == [3, 3]
    # The cap is part of the plan: changing it re-plans.
    capped.max_workspace_bytes = None
    for p in params:
        p.grad = torch.randn_like(p)
    capped.step()
    assert [b.matrices for b in capped._buckets] == [6]


def test_uneven_entries_fill_a_bucket_up_to_the_cap():
    """Expert stacks of 2 matrices under a cap of 4: buckets of 4 and 2, not three of 2."""
    params = [torch.nn.Parameter(torch.randn(2, 32, 64)) for _ in range(3)]
    probe = mk.Muon(params, backend="torch", matrix_view="batch", max_workspace_bytes=None)
    for p in params:
        p.grad = torch.randn_like(p)
    probe.step()
    cap = 4 * probe._buckets[0].matrix_bytes()
    opt = mk.Muon(params, backend="torch", matrix_view="batch", max_workspace_bytes=cap)
    opt.step()
    assert [b.matrices for b in opt._buckets] == [4, 2]


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_a_functionalized_call_keeps_its_stack(ns_dtype):
    """Under torch.func.functionalize the stack is a functional tensor with no memory to lend: the
    call keeps it (it raised on the storage address) and gives the eager bits."""
    stack = torch.randn(K, M, N)
    eager = torch_backend.orthogonalize(stack.clone(), KELLER, ns_dtype)
    traced = torch.func.functionalize(lambda s: torch_backend.orthogonalize(s, KELLER, ns_dtype, consume=True))
    assert torch.equal(traced(stack.clone()), eager)


def test_scratch_hands_out_the_asked_dtype_and_shape_and_only_grows():
    """One name, one allocation: the same tensor for the same request, a view of its first elements
    for a smaller one, a new allocation (kept from then on) for a larger one or another dtype — never
    the old bytes under another dtype; a request under inference mode gets a tensor that is not kept."""
    scratch = Scratch(torch.device("cpu"))
    first = scratch("x", (4, 8), torch.float32)
    assert scratch("x", (4, 8), torch.float32) is first
    small = scratch("x", (2, 3), torch.float32)
    assert small.shape == (2, 3) and small.dtype == torch.float32 and small.data_ptr() == first.data_ptr()
    half = scratch("x", (4, 8), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.shape == (4, 8)
    back = scratch("x", (2, 8), torch.float32)
    assert back.dtype == torch.float32 and back.shape == (2, 8) and back.data_ptr() != first.data_ptr()
    larger = scratch("x", (8, 8), torch.float32)
    assert larger.shape == (8, 8) and scratch("x", (8, 8), torch.float32) is larger
    assert scratch("y", (4, 8), torch.float32).data_ptr() != larger.data_ptr()  # names never share
    with torch.inference_mode():
        inside = scratch("z", (4, 4), torch.float32)
    assert "z" not in scratch.buffers and scratch("z", (4, 4), torch.float32) is not inside


def test_reinterpret_lends_a_dead_tensors_bytes_only_where_they_fit():
    """A consumed stack's memory as a work buffer: a view over its first bytes in another dtype and
    shape, never past its end, and never of a non-contiguous tensor (its bytes are not in order)."""
    from muon_kernels.workspace import reinterpret

    t = torch.randn(4, 6)
    half = reinterpret(t, torch.bfloat16, (6, 8))  # 96 bytes of 96
    assert half.shape == (6, 8) and half.dtype == torch.bfloat16 and half.data_ptr() == t.data_ptr()
    assert reinterpret(t, torch.bfloat16, (7, 7)) is None  # 98 bytes
    assert reinterpret(t.T, torch.float32, (2, 2)) is None
    assert reinterpret(t[:, :3], torch.float32, (2, 2)) is None


def _capped_buckets(entries, cap_matrices: int) -> list[int]:
    """Matrices per bucket of one torch-backend step under a cap of ``cap_matrices`` 32×64 matrices;
    ``entries``: (shape, matrix_view) per parameter."""
    params = [torch.nn.Parameter(torch.randn(shape)) for shape, _ in entries]
    groups = [{"params": [p], "matrix_view": view} for p, (_, view) in zip(params, entries)]
    probe = mk.Muon(groups, backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    probe.step()
    groups = [{"params": [p], "matrix_view": view} for p, (_, view) in zip(params, entries)]
    opt = mk.Muon(groups, backend="torch", max_workspace_bytes=cap_matrices * probe._buckets[0].matrix_bytes())
    opt.step()
    return [b.matrices for b in opt._buckets]


def test_no_bucket_crosses_the_cap_and_an_entry_over_it_stands_alone():
    """A matrix then a stack of 3 under a cap of 3: two buckets, not one of 4; a stack of 4 (over a
    cap of 2: an entry is never split) then a matrix: the stack alone, then the matrix."""
    assert _capped_buckets([((32, 64), None), ((3, 32, 64), "batch")], 3) == [1, 3]
    assert _capped_buckets([((4, 32, 64), "batch"), ((32, 64), None)], 2) == [4, 1]
