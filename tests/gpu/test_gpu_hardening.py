"""What a first GPU run must prove beyond the per-kernel tests (marked ``gpu``): the shapes that
matter, element-wise bounds beside the Frobenius ones (a few corrupted elements fail them),
bit-identical repeats (a cheap race detector: both paths are deterministic by design), batches past
grid axis 1's 65,535, a fused-update tensor cut between multi-tensor launches, the one-kernel
path at its real per-arch byte boundary, a checkpoint read onto the CPU resuming on the GPU, and a
host lr under capturable=True refused. ``make gpu-check`` runs these with NaN-filled work buffers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import available_backends, select_backend
from muon_kernels.ns_config import resolve_ns_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from oracles import plain_recurrence, reference_ns, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")
KELLER = resolve_ns_config("keller", 5, 1e-7)
BACKENDS = ["triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    ok, why = available_backends(DEV)[request.param]
    assert ok, f"{request.param} cannot run on this GPU: {why}"
    return select_backend(request.param, DEV)[0]


def _randn(*shape, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV)


# Element-wise bound in fp32: this many times the worst element error of torch's own fp32
# recurrence (cuBLAS) on the same input. Both kernels accumulate every output in one serial FMA
# chain over K (csrc/gemm.cuh SimtGemm; Triton's FMA lowering of tl.dot), whose worst elements sit
# higher than cuBLAS's (a serial chain loses most on the diagonal of X·Xᵀ, a sum of positive terms).
# On this test's 48×768² input (seed 0) the recurrence with that order, emulated on the CPU
# (tests/summation_order.py's serial_fma_matmul for every product), reaches 1.21e-6 against
# cuBLAS's 4.08e-7 on the H200: 2.96×; the Triton and CUDA kernels measured 1.05e-6 there (2.57×).
# 4× leaves room for the order and still fails a corrupted element (off by ~1e-2, not 1e-6). It is
# at least the former bound (2× + 1e-6·max|ref|) wherever torch's worst error is >= 5e-7·max|ref|
# (at 48×768² on the H200: 4.08e-7 against 9.3e-8). 16-bit results keep that former bound (their
# error is the operands' rounding, which every order shares).
FP32_ELEMENT_FACTOR = 4


def _check_against_fp64(out, G, ns_dtype):
    """Frobenius bound of DESIGN.md §5 and an element-wise one, both tied to torch's own error:
    a plain torch recurrence at the same precision, run on the same device."""
    ref = reference_ns(G.double())
    plain = plain_recurrence(G, ns_dtype)
    frobenius = 1e-4 if ns_dtype == torch.float32 else 2 * rel_err(plain, ref) + 1e-2
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= frobenius
    worst = (out.double() - ref).abs().max().item()
    torch_worst = (plain - ref).abs().max().item()
    if ns_dtype == torch.float32:
        bound = FP32_ELEMENT_FACTOR * torch_worst
    else:
        bound = 2 * torch_worst + 1e-6 * ref.abs().max().item()
    assert worst <= bound, (worst, torch_worst)


@pytest.mark.parametrize("shape", [(1, 4096, 4096), (1, 1024, 4096), (48, 768, 768)])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_the_shapes_that_matter(backend, shape, ns_dtype):
    G = _randn(*shape)
    _check_against_fp64(backend.orthogonalize(G, KELLER, ns_dtype), G, ns_dtype)


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_the_same_call_twenty_times_gives_the_same_bits(backend, ns_dtype):
    G = _randn(3, 257, 513, seed=1)
    first = backend.orthogonalize(G, KELLER, ns_dtype)
    for _ in range(19):
        assert torch.equal(backend.orthogonalize(G, KELLER, ns_dtype), first)


def test_a_batch_past_grid_axis_one_limit(backend):
    G = _randn(70_000, 4, 8, seed=2)
    out = backend.orthogonalize(G, KELLER, torch.float32)
    ref = select_backend("torch", DEV)[0].orthogonalize(G, KELLER, torch.float32)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-5
    for i in (0, 65_535, 69_999):  # both sides of the old axis-1 limit, against fp64
        assert rel_err(out[i], reference_ns(G[i].double())) <= 1e-4


def _train(shapes, backend_name, steps=2):
    g = torch.Generator(device="cpu").manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(DEV) / s[1] ** 0.5) for s in shapes]
    start = [p.detach().clone() for p in ps]
    opt = mk.Muon(ps, lr=0.02, backend=backend_name, ns_dtype=torch.float32)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(DEV)
        opt.step()
    return ps, start, opt


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_fused_update_tensor_cut_between_launches(backend_name):
    """Three 3000×2048 tensors: 6.1M elements each, more than one multi-tensor launch covers
    (256 chunks of 16,384 in the cuda backend), so tensors are cut between launches."""
    shapes = [(3000, 2048)] * 3
    ours, start, opt = _train(shapes, backend_name)
    ref, _, ref_opt = _train(shapes, "torch")
    for p, q, s in zip(ours, ref, start):
        assert ((p.double() - q.double()).norm() / (q.double() - s.double()).norm()).item() <= 1e-4
        m, r = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        torch.testing.assert_close(m, r, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7)


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_the_one_kernel_path_at_its_real_byte_boundary(ns_dtype):
    from muon_kernels.backends import triton_backend
    from muon_kernels.triton_kernels.config import arch_of
    from muon_kernels.triton_kernels.small_newton_schulz import budget

    elements = budget(ns_dtype, arch_of(torch.cuda.current_device())) // torch.finfo(ns_dtype).bits * 8
    m = 32
    inside, outside = (m, elements // m), (m, elements // m + 1)
    assert triton_backend.small_path(*inside, ns_dtype, DEV) and not triton_backend.small_path(*outside, ns_dtype, DEV)
    for (rows, cols), path in ((inside, "small"), (outside, "symmetric")):
        assert triton_backend.kernel_path(rows, cols, ns_dtype, DEV)[0] == path
        G = _randn(2, rows, cols, seed=4)
        _check_against_fp64(triton_backend.orthogonalize(G, KELLER, ns_dtype), G, ns_dtype)


@pytest.mark.parametrize("scale", [1.0, 1e40, 1e300])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_fp64_stacks_beyond_fp32s_range(backend, scale, ns_dtype):
    """fp64 parameters: both backends cast to fp32 before scaling, so an entry beyond fp32's range
    (1e40) became inf and the matrix NaN; now the torch backend normalizes fp64 stacks in fp64."""
    G = torch.randn(3, 96, 160, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEV)
    out = backend.orthogonalize(G * scale, KELLER, ns_dtype)
    _check_against_fp64(out, G, ns_dtype)


@pytest.mark.parametrize("preset", ["keller", "turbo"])
def test_an_fp64_stack_below_eps(backend, preset):
    """eps above the norm (U / eps): the fp64 normalization happens once (the kernels' own is the
    identity), not again with the floor eps; AOL (turbo) still reads the group's floor."""
    G = torch.randn(2, 64, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEV) * 1e-3
    config = resolve_ns_config(preset, None, 2.0)
    out = backend.orthogonalize(G, config, torch.float32)
    assert rel_err(out, reference_ns(G, preset, eps=2.0)) <= 1e-4


def _resumable(backend_name):
    """Two layers on the GPU with every kind of Muon state: int8 momentum (block scales, the
    stochastic-rounding step counter), NorMuon's second moment and the hyperball radius; AdamW state
    for the biases."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Linear(160, 96)).to(DEV)
    opt = mk.Muon(model.parameters(), lr=0.02, weight_decay=0.0, backend=backend_name, momentum_dtype="int8",
                  momentum_rounding="stochastic", adaptive="normuon", constraint="hyperball")
    return model, opt


def _grads(model, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(DEV)


@pytest.mark.parametrize("backend_name", ["auto", *BACKENDS])
def test_a_checkpoint_read_onto_the_cpu_resumes_on_the_gpu(backend_name, tmp_path):
    """``torch.load(..., map_location="cpu")`` then ``load_state_dict``: every Muon state tensor goes
    back to its parameter's device in the dtype it was saved in (checkpoint.restore_state_dtypes),
    and the resumed steps equal the uninterrupted ones bit for bit."""
    model, opt = _resumable(backend_name)
    twin, resumed = _resumable(backend_name)
    for seed in range(2):
        _grads(model, seed)
        opt.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", map_location="cpu")
    twin.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.ndim == 2:
            for key, value in opt.state[p].items():
                loaded = resumed.state[q][key]
                assert (loaded.device, loaded.dtype) == (value.device, value.dtype), key
                assert torch.equal(loaded, value), key
    for seed in range(2, 4):
        _grads(model, seed)
        _grads(twin, seed)
        opt.step()
        resumed.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_host_lr_under_capturable_is_refused_before_anything_moves():
    """capturable=True with a tensor lr on the host (replaced after construction): the step names the
    group, the parameter and the fix, and changes no parameter and no state."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 48)).to(DEV)
    opt = mk.Muon(model.parameters(), lr=torch.tensor(0.02, device=DEV), capturable=True)
    _grads(model, 0)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    opt.param_groups[0]["lr"] = torch.tensor(0.02)
    _grads(model, 1)
    with pytest.raises(ValueError, match=r"param group 0 has capturable=True and lr on cpu, but parameter .* is on "
                                         r"cuda.*put lr on the parameters' device"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert opt.state[p].keys() == state[p].keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[p].items())
