"""The torch backend's CPU strategy: matrices per Newton–Schulz call, momentum written straight into
the stack, the one-pass normalization for norms in the safe range — each equal to the plain way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels.backends import torch_backend
from muon_kernels.ns_config import resolve_ns_config


def test_matrices_per_call_follow_the_byte_budget_on_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    budget = torch_backend.CPU_CALL_BYTES
    per = torch_backend.matrices_per_call
    assert per(256, 1024, torch.bfloat16, cpu) == budget // (2 * (2 * 256 * 1024 + 2 * 256 * 256)) == 19
    assert per(192, 192, torch.bfloat16, cpu) == budget // (2 * 4 * 192 * 192) == 85
    assert per(256, 2048, torch.float32, cpu) == 1  # large fp32: one each
    assert per(64, 64, torch.float32, cpu) == budget // (4 * 4 * 64 * 64)
    rows = torch_backend.CPU_SYMMETRIC_MIN_ROWS
    assert per(rows, rows, torch.bfloat16, cpu) == per(768, 3072, torch.bfloat16, cpu) == 1  # symmetric products
    assert per(rows - 1, rows - 1, torch.bfloat16, cpu) > 1
    assert per(768, 3072, torch.bfloat16, cuda) is None


def test_plan_says_the_cpu_strategy_and_buckets_are_called_in_chunks(monkeypatch):
    model = nn.Sequential(*[nn.Linear(256, 1024) for _ in range(5)])  # oriented 256×1024
    opt = mk.Muon(model.parameters(), ns_dtype=torch.bfloat16)
    rows = [r for r in opt.plan() if r.method == "Muon"]
    per = torch_backend.matrices_per_call(256, 1024, torch.bfloat16, torch.device("cpu"))
    assert all(f"CPU: up to {per} matrices per call" in r.why for r in rows)
    seen = []
    original = torch_backend.orthogonalize
    monkeypatch.setattr(torch_backend, "orthogonalize",
                        lambda s, c, d, **kw: seen.append(s.shape[0]) or original(s, c, d, **kw))
    monkeypatch.setattr(torch_backend, "CPU_CALL_BYTES", 2 * 2 * (2 * 256 * 1024 + 2 * 256 * 256))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert seen == [2, 2, 1]


def test_reused_cpu_buffers_give_the_same_steps_as_fresh_ones(monkeypatch):
    """The stack and the orthogonalized output are the bucket's buffers, reused every step: a
    twin optimizer rebuilt before every step (fresh buffers) must take the same steps."""
    monkeypatch.setattr(torch_backend, "CPU_CALL_BYTES", 2**14)  # several chunks per bucket
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 40), nn.Linear(40, 24))
    b = nn.Sequential(nn.Linear(40, 24), nn.Linear(24, 40), nn.Linear(40, 24))
    b.load_state_dict(a.state_dict())
    opt = mk.Muon(mk.param_groups(a))
    state = None
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        fresh = mk.Muon(mk.param_groups(b))
        if state is not None:
            fresh.load_state_dict(state)
        fresh.step()
        state = fresh.state_dict()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("form, nesterov", [("ema", True), ("ema", False), ("sgd", True), ("sgd", False)])
def test_momentum_written_into_the_stack_equals_blend_then_concatenate(form, nesterov):
    torch.manual_seed(0)
    shapes = [(24, 40), (40, 24), (24, 40)]  # wide, tall (transposed into the stack), wide
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    opt = mk.Muon(params, momentum_form=form, nesterov=nesterov, momentum=0.9)
    [bucket], _ = opt._plan_buckets([(0, opt.param_groups[0], params)])
    grads = [torch.randn(s) for s in shapes]
    bufs = [torch.randn(s) for s in shapes]
    want_bufs = [b.clone() for b in bufs]
    stack = torch_backend.momentum_stack(bucket, grads, bufs, opt.param_groups)
    mu = 0.9
    blended = []
    for g, b in zip(grads, want_bufs):  # independent: torch's per-tensor ops, then transpose and cat
        if form == "ema":
            b.lerp_(g, 1 - mu)
            u = torch.lerp(g, b, mu) if nesterov else b
        else:
            b.mul_(mu).add_(g)
            u = torch.add(g, b, alpha=mu) if nesterov else b
        blended.append(u if u.shape[0] <= u.shape[1] else u.mT)
    assert torch.equal(stack, torch.stack(blended))
    for b, w in zip(bufs, want_bufs):
        assert torch.equal(b, w)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["keller", "polar_express"])
def test_scaled_normalization_equals_the_plain_formula_bit_for_bit(ns_dtype, preset):
    """Where the plain formula neither overflows nor underflows (norms 1e-8…1e8), the power-of-two
    scaling changes no bit: the same two-stage norm, divided and rounded once."""
    G = torch.randn(5, 33, 70, generator=torch.Generator().manual_seed(1)) * torch.logspace(-8, 8, 5).view(5, 1, 1)
    config = resolve_ns_config(preset, 5, 1e-7)
    norms = torch.linalg.vector_norm(torch.linalg.vector_norm(G, dim=-1), dim=-1).view(5, 1, 1)
    plain = torch.div(G, (norms * config.norm_scale + config.norm_offset).clamp_min(config.floor),
                      out=torch.empty(G.shape, dtype=ns_dtype))
    assert torch.equal(torch_backend.normalize(G, config, ns_dtype), plain)


@pytest.mark.parametrize("steps", [4, 5])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_a_result_is_not_reused_by_the_next_call(ns_dtype, steps):
    """The thread's scaled-copy buffer serves only a cast copy (a 16-bit iteration): an fp32
    normalization's output is the recurrence's own spare X, which holds the result after an even
    number of steps, so reusing it would hand two calls' results one memory."""
    g = torch.Generator().manual_seed(0)
    config = resolve_ns_config("keller", steps, 1e-7)
    first = torch_backend.orthogonalize(torch.randn(3, 16, 40, generator=g), config, ns_dtype)
    kept = first.clone()
    second = torch_backend.orthogonalize(torch.randn(3, 16, 40, generator=g), config, ns_dtype)
    assert torch.equal(first, kept) and first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


SYMMETRIC_TOLERANCE = {torch.float32: 2**-20, torch.bfloat16: 2**-7}  # relative to Σ|x_ik·x_jk|


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, k", [(385, 700), (400, 96), (7, 5), (1030, 40)])
def test_symmetric_matmul_is_the_product_from_its_upper_block_triangle(dtype, m, k):
    """X·Xᵀ and b·A + c·A·Aᵀ from the upper block triangle (2 blocks; 5 of 206-rows for m=1030):
    the lower triangle mirrors the upper one, and every entry is the fp64 product's within the
    dtype's rounding (one rounding of the result plus fp32 accumulation, relative to Σ|terms|)."""
    g = torch.Generator().manual_seed(m)
    X = torch.randn(m, k, generator=g).to(dtype)
    out = torch.empty(m, m, dtype=dtype)
    assert torch_backend.symmetric_matmul(X, out) is out
    x = X.double()
    exact, bound = x @ x.T, x.abs() @ x.abs().T
    blocks = max(2, -(-m // torch_backend.CPU_SYMMETRIC_BLOCK_ROWS))
    edge = -(-m // blocks)  # no block is taller: entries this far below the diagonal are mirrored
    assert torch.equal(out.tril(-edge), out.triu(edge).T)
    assert ((out.double() - exact).abs() <= SYMMETRIC_TOLERANCE[dtype] * bound).all()
    A = out.clone()
    B = torch_backend.symmetric_matmul(A, torch.empty_like(A), A, beta=-4.775, alpha=2.0315)
    a = A.double()
    exact, bound = -4.775 * a + 2.0315 * a @ a, 4.775 * a.abs() + 2.0315 * a.abs() @ a.abs()
    assert torch.equal(B.tril(-edge), B.triu(edge).T)
    assert ((B.double() - exact).abs() <= SYMMETRIC_TOLERANCE[dtype] * bound).all()


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_large_cpu_matrices_take_the_symmetric_products(ns_dtype, monkeypatch):
    """From CPU_SYMMETRIC_MIN_ROWS rows: one matrix per call, products from the upper block rows,
    the same Newton–Schulz result as the batched GEMMs within the iteration dtype's rounding."""
    rows = torch_backend.CPU_SYMMETRIC_MIN_ROWS
    config = resolve_ns_config("keller", 5, 1e-7)
    G = torch.randn(2, rows, rows + 64, generator=torch.Generator().manual_seed(0))
    calls = []
    original = torch_backend.symmetric_matmul
    monkeypatch.setattr(torch_backend, "symmetric_matmul", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast = torch_backend.orthogonalize(G, config, ns_dtype)
    assert len(calls) == 2 * 2 * 5  # per matrix and step: X·Xᵀ and A·A
    monkeypatch.setattr(torch_backend, "CPU_SYMMETRIC_MIN_ROWS", rows + 1)
    batched = torch_backend.orthogonalize(G, config, ns_dtype)
    assert len(calls) == 20
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[ns_dtype]  # bf16: a few roundings of O(1) entries
    assert (fast.float() - batched.float()).abs().max() <= tolerance
    model = nn.Sequential(nn.Linear(rows + 64, rows))
    monkeypatch.setattr(torch_backend, "CPU_SYMMETRIC_MIN_ROWS", rows)
    [row] = [r for r in mk.Muon(model.parameters(), ns_dtype=ns_dtype).plan() if r.method == "Muon"]
    assert row.path == "symmetric-mm" and "upper block triangle" in row.why


@pytest.mark.parametrize("shape", [(1030, 300), (300, 1030), (40, 24)])
def test_transpose_into_copies_the_transpose(shape):
    """Tall sources of 512+ rows go in row blocks, the rest in one copy_: the same bits either way."""
    src = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    dst = torch.empty(shape[::-1])
    assert torch_backend.transpose_into(dst, src) is dst
    assert torch.equal(dst, src.T)


def test_tall_matrices_step_like_their_transposes(monkeypatch):
    """A tall matrix's blend goes through a scratch into its transposed slot and its update through
    a contiguous copy out of it: the step equals the same matrix stored wide (transposed) bit for bit
    (the wide twin's lr carries the tall shape's scale, √(96/40))."""
    monkeypatch.setattr(torch_backend, "TRANSPOSE_BLOCK_ROWS", 16)  # the blocked copies at test size
    g = torch.Generator().manual_seed(3)
    tall = nn.Parameter(torch.randn(96, 40, generator=g))
    wide = nn.Parameter(tall.detach().T.clone())
    opts = [mk.Muon([p], lr=lr, weight_decay=0.0, ns_dtype=torch.float32)
            for p, lr in ((tall, 0.1), (wide, 0.1 * (96 / 40) ** 0.5))]
    for _ in range(3):
        grad = torch.randn(96, 40, generator=g)
        tall.grad, wide.grad = grad, grad.T.contiguous()
        for opt in opts:
            opt.step()
    assert torch.equal(tall.detach().T, wide.detach())
