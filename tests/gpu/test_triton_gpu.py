"""The Triton backend on a real GPU (marked ``gpu``; skipped where torch sees no CUDA device).

Same oracles as the CPU tests (fp64 recurrence, DESIGN.md §5 bounds, the torch backend), plus what
only a device shows: launch counts, torch.compile, and bit-identical resume in a new process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import muon_kernels as mk
from muon_kernels.ns_config import resolve_ns_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from arrival_counters import check_streams_and_graph  # noqa: E402
from oracles import plain_recurrence, reference_ns, rel_err, scalar_map  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
if torch.cuda.is_available():
    from muon_kernels.triton_kernels.newton_schulz import newton_schulz, normalize
    from muon_kernels.triton_kernels.small_newton_schulz import small_newton_schulz
    from muon_kernels.triton_kernels.symmetric_matmul import symmetric_matmul

DEV = torch.device("cuda")
SHAPES = [(1, 1, 64), (3, 96, 200), (2, 257, 513), (1, 640, 640), (2, 130, 1000)]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# The one-kernel path only takes matrices that fit one CTA: the first two shapes.
PATHS = [(shape, "symmetric") for shape in SHAPES] + [(shape, "small") for shape in SHAPES[:2]]


@pytest.mark.parametrize("shape, path", PATHS)
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_newton_schulz_against_fp64(shape, path, ns_dtype):
    G = _randn(*shape)
    ref = reference_ns(G)
    fn = newton_schulz if path == "symmetric" else small_newton_schulz
    out = fn(G.float().to(DEV), resolve_ns_config("keller", 5, 1e-7), ns_dtype).cpu()
    if ns_dtype == torch.float32:
        assert rel_err(out, ref) <= 1e-4
    else:
        assert rel_err(out, ref) <= 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2


@pytest.mark.parametrize("preset", ["keller", "quintic", "polar_express"])
def test_scalar_map_on_device(preset):
    D, expected = scalar_map(preset)
    for fn in (newton_schulz, small_newton_schulz):
        out = fn(D[None].to(DEV), resolve_ns_config(preset, 5, 1e-7), torch.float32)[0].cpu()
        torch.testing.assert_close(out.diagonal().double(), expected, rtol=0, atol=1e-4)


def test_symmetric_matmul_and_mirrored_tiles_on_device():
    X = _randn(3, 300, 700).to(DEV, torch.bfloat16)
    out = symmetric_matmul(X)
    exact = X.double() @ X.double().mT
    assert rel_err(out, exact) <= 2 * 2.0**-8
    assert torch.equal(out[:, :128, 128:256], out[:, 128:256, :128].mT)


def test_triangle_coordinates_are_exact_with_the_gpus_approximate_sqrt():
    """tl.sqrt compiles to sqrt.approx here, which can land j one low as well as one high."""
    import triangle_check

    triangle_check.check(DEV)


def test_split_products_in_a_cuda_graph_and_on_two_streams_give_the_eager_bits():
    """A split product reduces in its own launch: the last slice of a tile to arrive (an integer
    counter per tile, acquire-release at GPU scope) sums the tile's partials in slice order. Its
    counters are kept per stream and left at zero by every launch; under capture each launch takes
    fresh zeros, zeroed again on every replay. So: eager repeats, graph replays and two streams
    running split products at once all give the same bits, within bf16's error of fp64, and every
    kept counter is zero afterwards."""
    from dataclasses import replace

    from muon_kernels.triton_kernels.config import matmul_config

    cfg = replace(matmul_config(DEV, torch.bfloat16, 1024, 1024, 4096, kind="symmetric"), split_k=3)
    Xs = [_randn(1, 1024, 4096, seed=s).to(DEV, torch.bfloat16) for s in (1, 2)]
    eager = [symmetric_matmul(X, config=cfg) for X in Xs]
    for X, out in zip(Xs, eager):
        assert rel_err(out, X.double() @ X.double().mT) <= 2 * 2.0**-8
        assert torch.equal(out, symmetric_matmul(X, config=cfg))
    # Persistent programs (a tile's last arrival need not be its last slice), a batch, eight slices:
    # the same sum in the same order, so the same bits as the plain split launch, every time.
    X = _randn(3, 640, 2048, seed=3).to(DEV, torch.bfloat16)
    plain = symmetric_matmul(X, config=replace(cfg, split_k=8))
    for _ in range(10):
        assert torch.equal(symmetric_matmul(X, config=replace(cfg, split_k=8, persistent=True)), plain)

    check_streams_and_graph(lambda x: symmetric_matmul(x, config=cfg), Xs, eager)


def test_normalization_in_a_cuda_graph_and_on_two_streams_gives_the_eager_bits():
    """Each matrix's partials are reduced by its last tile to finish, at the same per-stream
    arrival counters as the split products: eager repeats, graph replays and two streams at once
    give the same bits, within bf16's rounding of the fp64 quotient."""
    config = resolve_ns_config("keller", 5, 1e-7)
    Xs = [_randn(3, 1024, 4096, seed=s).to(DEV, torch.float32) for s in (1, 2)]
    eager = [normalize(X, config, torch.bfloat16) for X in Xs]
    for X, out in zip(Xs, eager):
        assert rel_err(out, X.double() / X.double().norm(dim=(1, 2), keepdim=True)) <= 2.0**-8
        assert torch.equal(out, normalize(X, config, torch.bfloat16))
    check_streams_and_graph(lambda x: normalize(x, config, torch.bfloat16), Xs, eager)
    # One tile per matrix (Triton makes tiles == 1 a constant) in a batch past the counters' first
    # 1024, and 2048 tiles in one matrix (the reduction's two rounds of 1024).
    for shape in ((1100, 8, 16), (1, 4096, 8192)):
        X = _randn(*shape, seed=3).to(DEV, torch.float32)
        out = normalize(X, config, torch.bfloat16)
        assert rel_err(out, X.double() / X.double().norm(dim=(1, 2), keepdim=True)) <= 2.0**-8, shape
        assert torch.equal(out, normalize(X, config, torch.bfloat16)), shape


def test_nan_member_does_not_leak_on_device():
    G = _randn(4, 200, 300).float().to(DEV)
    G[2, 5, 5] = float("nan")
    out = newton_schulz(G, resolve_ns_config("keller", 5, 1e-7), torch.bfloat16)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()


def _params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) / s[1] ** 0.5).to(DEV, dtype)) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_and_per_element_fused_kernels_give_the_same_bits(dtype, monkeypatch):
    """The fused momentum and update kernels' 16-byte path (tests/test_triton_aot.py checks its
    LDG.E.128/STG.E.128) and their per-element path give the same parameters and momentum bit for
    bit over wide and tall (transposed) matrices; parameters 4 bytes off 16-byte alignment (views
    into a flat buffer) take the per-element path and step like the aligned ones."""
    from muon_kernels.triton_kernels import fused_update

    shapes = [(768, 768), (3072, 768), (768, 3072), (256, 1024)]
    real, taken = fused_update.aligned, []
    monkeypatch.setattr(fused_update, "aligned", lambda *args: taken.append(real(*args)) or taken[-1])

    def run(params):
        opt = mk.Muon(params, lr=0.02, backend="triton", weight_decay=0.01)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(DEV, dtype)
            opt.step()
        return [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]

    vector = run(_params(shapes, dtype))
    assert taken and all(taken)
    taken.clear()
    flat = torch.empty(sum(a * b for a, b in shapes) + 2, device=DEV, dtype=dtype)
    offset, shifted = 4 // dtype.itemsize, []
    for p in _params(shapes, dtype):
        view = flat[offset:offset + p.numel()].view(p.shape)
        view.copy_(p.detach())
        shifted.append(torch.nn.Parameter(view))
        offset += p.numel()
    per_element = run(shifted)
    assert all(p.data_ptr() % 16 == 4 for p in shifted)
    assert True in taken and False in taken  # momentum (fresh buffers) vector; updates of shifted parameters not
    for a, b in zip(vector, per_element):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_torch_backend(dtype):
    shapes = [(192, 64), (64, 192), (64, 64), (256, 64), (64, 256), (2048, 2048)]
    a, b = _params(shapes, dtype), _params(shapes, dtype)
    start = [p.detach().clone() for p in a]
    opt_a = mk.Muon(a, lr=0.05, backend="triton")
    opt_b = mk.Muon(b, lr=0.05, backend="torch")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g).to(DEV, dtype)
            q.grad = p.grad.clone()
        opt_a.step()
        opt_b.step()
    for p, q, s in zip(a, b, start):
        assert ((p.double() - q.double()).norm() / (q.double() - s.double()).norm()).item() <= 3e-2


def test_direct_launches_match_tritons_dispatch_bit_for_bit():
    """triton_kernels.launch calls a compiled kernel's launcher directly once its argument class has
    been launched (tests/test_launch.py checks its key and call against Triton on a CPU): here a
    NorMuon + hyperball step, a plain step with a split-K product and a small bucket, and an input
    off 16-byte alignment (new keys for the normalization kernels that read it: Triton specializes
    on alignment) give the bits of Triton's own dispatch, and direct launches were made."""
    from muon_kernels.triton_kernels import launch
    from muon_kernels.triton_kernels.newton_schulz import _sum_squares_kernel
    from muon_kernels.triton_kernels.symmetric_matmul import _symmetric_matmul_kernel

    shapes = [(64, 192), (1024, 4096), (768, 768), (768, 768)]
    results = []
    for direct in (False, True):
        launch.clear()
        with launch.direct_launches(direct):
            ps = _params(shapes)
            opt = mk.Muon([dict(params=ps[:2]), dict(params=ps[2:], adaptive="normuon", constraint="hyperball",
                                                     weight_decay=0.0)], lr=0.02, backend="triton", dispatch="table")
            g = torch.Generator().manual_seed(3)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g).to(DEV)
                opt.step()
            norms = launch.entries(_sum_squares_kernel)
            G = _randn(2 * 300 * 500 + 1).float().to(DEV)[1:].view(2, 300, 500)  # 4 bytes off alignment
            ns = newton_schulz(G, resolve_ns_config("keller", 5, 1e-7), torch.bfloat16)
            results.append([p.detach().clone() for p in ps] + [ns])
        assert (launch.entries(_symmetric_matmul_kernel) > 0) == direct
        assert launch.entries(_sum_squares_kernel) == (norms + 1 if direct else 0)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_consumed_stacks_give_the_kept_stacks_bits(monkeypatch):
    """A stack the caller gives up (``consume=True``, every local bucket of a step) holds one of
    Newton–Schulz's m×n buffers — X normalized over it (bf16 stack, bf16 iteration; fp32 and fp32),
    or the products' second buffer in its memory (fp32 stack, bf16 iteration) — on every Triton path,
    standard and Gram NS: the bits of a kept stack, plain and replayed (the result rebuilt over each
    new stack's memory). The debug fill turns replay off, so it is cleared here (the plain calls
    run with it in tests/interpreter/test_consume_triton.py)."""
    from muon_kernels.triton_kernels import replay
    from muon_kernels.triton_kernels.ops import _CONSUMING, _NEWTON_SCHULZ

    monkeypatch.delenv("MUON_KERNELS_DEBUG_FILL", raising=False)
    configs = [resolve_ns_config("keller", 5, 1e-7), resolve_ns_config("keller", 5, 1e-7, "gram", ns_gram_restarts=(1, 3))]
    for path in ("symmetric", "cublas", "symmetric-cublas"):
        for stack_dtype, ns_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                      (torch.float32, torch.float32)):
            for cfg in configs:
                stack = _randn(3, 512, 1536, seed=7).to(DEV, stack_dtype)
                with replay.replays(False):
                    kept = _NEWTON_SCHULZ[path](stack, cfg, ns_dtype)
                    assert torch.equal(_NEWTON_SCHULZ[path](stack.clone(), cfg, ns_dtype, consume=True), kept)
                for _ in range(3):  # recorded, then replayed
                    assert torch.equal(replay.call(_CONSUMING[path], stack.clone(), cfg, ns_dtype), kept)


def test_replayed_calls_give_the_plain_bits(monkeypatch):
    """triton_kernels.replay (tests/test_replay.py checks its launcher arguments on a CPU): a recorded
    call replayed with fresh buffers gives the plain path's bits — standard NS with split products
    (1024×4096 at batch 1: X·Xᵀ splits on every GPU with more than 18 SMs), Gram NS with restarts,
    the one-kernel small path, a batched transposed view and an input off 16-byte alignment — on
    the default stream and on a side stream (its own recording and arrival counters), and a
    Triton-backend step replays every bucket with the same parameters as without replay. The debug
    fill turns replay off, so it is cleared here."""
    from muon_kernels.triton_kernels import replay

    monkeypatch.delenv("MUON_KERNELS_DEBUG_FILL", raising=False)
    keller = resolve_ns_config("keller", 5, 1e-7)
    gram = resolve_ns_config("keller", 5, 1e-7, "gram", ns_gram_restarts=(1, 3))
    cases = [(newton_schulz, _randn(1, 1024, 4096).float().to(DEV), keller),
             (newton_schulz, _randn(2, 512, 2048, seed=1).float().to(DEV), gram),
             (small_newton_schulz, _randn(6, 40, 96, seed=2).float().to(DEV), keller),
             (newton_schulz, _randn(3, 700, 300, seed=3).float().to(DEV).mT, keller),
             (newton_schulz, _randn(2 * 300 * 500 + 1, seed=4).float().to(DEV)[1:].view(2, 300, 500), keller)]
    side = torch.cuda.Stream()
    replay.clear()
    for fn, stack, cfg in cases:
        with replay.replays(False):
            plain = fn(stack, cfg, torch.bfloat16)
        for stream in (torch.cuda.current_stream(), side):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                replayed = [replay.call(fn, stack, cfg, torch.bfloat16) for _ in range(4)]
            torch.cuda.current_stream().wait_stream(stream)
            for out in replayed:
                assert torch.equal(out, plain)
    assert replay.plans() == 2 * len(cases)
    # The split case's two recordings hold their own stream's arrival counters.
    split = [plan for key, plan in replay._plans.items() if key[1][0] is keller and key[2] == (1, 1024, 4096)]
    assert len(split) == 2 and all(plan.kept for plan in split)
    assert not {id(t) for t in split[0].kept} & {id(t) for t in split[1].kept}

    shapes = [(1024, 4096), (768, 768), (768, 768), (64, 192)]
    results = []
    for enabled in (False, True):
        with replay.replays(enabled):
            ps = _params(shapes)
            opt = mk.Muon(ps, lr=0.02, backend="triton", dispatch="table")
            g = torch.Generator().manual_seed(5)
            for _ in range(4):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g).to(DEV)
                opt.step()
            results.append([p.detach().clone() for p in ps])
    assert replay.plans() >= 2 * len(cases) + len(opt._buckets)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _kernel_launches(opt) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
               and "memset" not in e.name.lower())


@pytest.mark.parametrize("fill", [False, True], ids=["plain", "debug-fill"])
def test_launch_count_is_constant_per_bucket(monkeypatch, fill):
    """4 + 3·steps launches per symmetric bucket and 5 per small bucket, whatever the parameter count
    (the list: README.md "Kernel launches of one step"; counted on the CPU interpreter by
    tests/interpreter/test_launch_count_triton.py). ``MUON_KERNELS_DEBUG_FILL=nan`` (which ``make
    gpu-check`` sets for the whole run) adds one fill per work buffer: the stack, the normalized X,
    its partial sums and per-matrix norms, and each product's output (one call's A, B and two m×n
    buffers, refilled before each reuse) — 4 + 3·steps for the symmetric bucket, 5 for the small
    one (tests/interpreter/test_launch_count_triton.py's WORK_BUFFERS). The plain count is measured
    with the variable cleared, whatever the caller set."""
    if fill:
        monkeypatch.setenv("MUON_KERNELS_DEBUG_FILL", "nan")
    else:
        monkeypatch.delenv("MUON_KERNELS_DEBUG_FILL", raising=False)
    steps = 5
    counts = []
    # At least 4 layers: 4 × 136 triangle tiles fill two waves of any GPU up to 272 SMs, so no product
    # splits along K (a split takes one more work buffer, one more fill).
    for layers in (4, 8):
        shapes = [(2048, 2048), (64, 256)] * layers
        ps = _params(shapes)
        opt = mk.Muon(ps, backend="triton", ns_steps=steps)
        assert {(r.shape, r.path) for r in opt.plan()} == {((2048, 2048), "symmetric"), ((64, 256), "small")}
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()  # compile
        counts.append(_kernel_launches(opt))
    launches = (4 + 3 * steps) + 5
    fills = (4 + 3 * steps) + 5 if fill else 0
    assert counts[0] == counts[1] == launches + fills, counts


def test_auto_dispatch_table_by_shape():
    """The static table (dispatch="table"; the measuring mode is tests/gpu/test_measured_gpu.py's), on
    both sides of this GPU's crossover: muon_kernels/backends/crossovers.json's where it has this
    GPU model or its capability (sm_90: m >= 4096, from the H200 run), else the default."""
    from muon_kernels.backends import triton_min_m

    min_m, _ = triton_min_m(torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    below, at = (min_m // 2, min_m), (min_m, min_m)
    ps = _params([(64, 256), (768, 3072), below, at])
    rows = {r.shape: r for r in mk.Muon(ps, dispatch="table").plan()}
    assert (rows[(64, 256)].backend, rows[(64, 256)].path) == ("triton", "small")
    assert rows[(768, 3072)].backend == "torch"
    assert rows[below].backend == "torch"
    assert (rows[at].backend, rows[at].path) == ("triton", "symmetric")


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(DEV)  # noqa: E731
    eager_model, compiled_model = make(), make()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager_opt = mk.Muon(eager_model.parameters(), backend="triton", ns_dtype=torch.float32)
    compiled_opt = mk.Muon(compiled_model.parameters(), backend="triton", ns_dtype=torch.float32)
    x = torch.randn(32, 64, device=DEV)

    def train_step(model, opt):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    compiled_step = torch.compile(train_step)
    for _ in range(3):
        train_step(eager_model, eager_opt)
        compiled_step(compiled_model, compiled_opt)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


_RESUME = """
import sys, torch, muon_kernels as mk
shapes = [(2048, 2048), (256, 64), (64, 256)]
def params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=g) / s[1] ** 0.5).cuda()) for s in shapes]
def steps(ps, opt, seeds):
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).cuda()
        opt.step()
mode, path = sys.argv[1], sys.argv[2]
ps = params()
opt = mk.Muon(ps, backend="triton")
if mode == "first":
    steps(ps, opt, [1, 2, 3])
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict()}, path)
else:
    saved = torch.load(path, weights_only=True)
    with torch.no_grad():
        for p, q in zip(ps, saved["params"]):
            p.copy_(q)
    opt.load_state_dict(saved["opt"])
    steps(ps, opt, [4, 5, 6])
    torch.save([p.detach() for p in ps], path + ".resumed")
"""


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(_RESUME)
    ckpt = str(tmp_path / "ckpt.pt")
    for mode in ("first", "second"):
        subprocess.run([sys.executable, str(script), mode, ckpt], check=True, timeout=600)
    resumed = torch.load(ckpt + ".resumed", weights_only=True)
    ps = _params([(2048, 2048), (256, 64), (64, 256)])
    opt = mk.Muon(ps, backend="triton")
    for seed in range(1, 7):
        g = torch.Generator().manual_seed(seed)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(DEV)
        opt.step()
    for p, q in zip(ps, resumed):
        assert torch.equal(p.detach().cpu(), q.cpu())


@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
def test_cuda_graph_capture_of_a_whole_step_matches_eager(backend):
    """capturable=True with a device lr: warm up eagerly, capture opt.step() once, replay it while a
    scheduler writes the lr tensor in place; parameters match an eager twin step for step."""
    ok, why = mk.available_backends(DEV)[backend]
    assert ok, f"{backend} backend cannot run on this GPU: {why}"
    shapes = [(256, 64), (64, 256), (96, 96), (2048, 2048)]
    lr_values = [0.02, 0.015, 0.01, 0.005]

    def make():
        ps = _params(shapes) + [torch.nn.Parameter(torch.zeros(64, device=DEV))]
        lr = torch.tensor(lr_values[0], device=DEV)
        opt = mk.Muon([{"params": ps[:-1], "use_muon": True}, {"params": ps[-1:], "use_muon": False}], lr=lr,
                      adamw_lr=torch.tensor(1e-3, device=DEV), backend=backend, capturable=True)
        for p in ps:
            p.grad = torch.zeros_like(p)
        return ps, opt, lr

    def fill(ps, seed):
        g = torch.Generator().manual_seed(seed)
        for p in ps:
            p.grad.copy_(torch.randn(p.shape, generator=g))

    eager, eager_opt, eager_lr = make()
    graphed, graphed_opt, graphed_lr = make()
    for ps, opt in ((eager, eager_opt), (graphed, graphed_opt)):  # one eager step each: state and tables exist
        fill(ps, 0)
        opt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fill(graphed, 0)
        graphed_opt.step()  # warm-up on the capture stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(side)
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()
    for i, lr in enumerate(lr_values):
        eager_lr.fill_(lr)
        graphed_lr.fill_(lr)
        fill(eager, i + 1)
        fill(graphed, i + 1)
        eager_opt.step()
        graph.replay()
        torch.cuda.synchronize()
        for p, q in zip(eager, graphed):
            torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_opt_in_autotuning_persists_its_choice(tmp_path, monkeypatch):
    from muon_kernels.triton_kernels import autotune

    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "tune.json"))
    G = _randn(2, 512, 1536).to(DEV)
    config = resolve_ns_config("keller", 5, 1e-7)
    first = newton_schulz(G, config, torch.bfloat16)
    saved = (tmp_path / "tune.json").read_text()
    assert "symmetric|" in saved and "ns_update|" in saved
    again = newton_schulz(G, config, torch.bfloat16)
    assert torch.equal(first, again)  # the persisted configs, so the same bits
    assert (tmp_path / "tune.json").read_text() == saved
    ref = reference_ns(G.cpu())
    assert rel_err(first.cpu(), ref) <= 2 * rel_err(plain_recurrence(G.cpu(), torch.bfloat16), ref) + 1e-2


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sgd_momentum_buffers_are_torch_sgds_bit_for_bit_on_the_gpu(backend, dtype):
    """The fused kernels compiled without multiply-add contraction (Triton: config.rounds_as_written, CUDA
    __fmul_rn): the SGD buffer is torch.optim.SGD's ``mul_`` then ``add_`` on the GPU too, not one FMA."""
    p = torch.nn.Parameter(torch.zeros(256, 512, dtype=dtype, device=DEV))
    q = torch.nn.Parameter(torch.zeros(256, 512, dtype=dtype, device=DEV))
    opt = mk.Muon([p], backend=backend, momentum=0.9, momentum_form="sgd", nesterov=True, ns_steps=1)
    sgd = torch.optim.SGD([q], lr=0.0, momentum=0.9)
    g = torch.Generator(device=DEV).manual_seed(1)
    for _ in range(4):
        p.grad = (torch.randn(256, 512, generator=g, device=DEV) * 3).to(dtype)
        q.grad = p.grad.clone()
        opt.step()
        sgd.step()
    assert opt._buckets[0].backend.NAME == backend
    assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])
