"""Split-K, TMA descriptors, persistent grids, X·Yᵀ with a shift, and the Gram driver on the CPU interpreter.

fp32 operands (DESIGN.md §5: ≤ 1e-4 against fp64; the interpreter upcasts 16-bit operands), small
shapes that are not multiples of the 32-wide interpreter tiles, batches, transposed views.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from muon_kernels import recurrence, workspace
from muon_kernels.ns_config import resolve_ns_config
from muon_kernels.triton_kernels import newton_schulz as tns
from muon_kernels.triton_kernels import symmetric_matmul as tsym
from muon_kernels.triton_kernels.config import INTERPRETER_CONFIG, INTERPRETER_SMS, forced
from muon_kernels.triton_kernels.descriptors import descriptor
from muon_kernels.triton_kernels.newton_schulz import gram_newton_schulz, newton_schulz, ns_update
from muon_kernels.triton_kernels.symmetric_matmul import launch_shape, symmetric_matmul
from oracles import plain_recurrence, reference_ns, rel_err, scalar_map

FP32_TOL = 1e-4
BASE = INTERPRETER_CONFIG
VARIANTS = {"split2": replace(BASE, split_k=2), "split3+persistent": replace(BASE, split_k=3, persistent=True),
            "tma": replace(BASE, tma=True),
            "tma+split2+persistent": replace(BASE, tma=True, split_k=2, persistent=True)}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("shape", [(2, 40, 130), (1, 70, 97), (3, 33, 100)])
def test_variants_match_fp64_and_the_plain_kernel(shape, variant):
    """m and k off the 32-wide tiles, batches; every variant against fp64 and the unsplit pointer kernel."""
    X = _randn(*shape)
    cfg = VARIANTS[variant]
    out = symmetric_matmul(X, config=cfg)
    assert rel_err(out, X.double() @ X.double().mT) <= FP32_TOL
    assert rel_err(out, symmetric_matmul(X, config=BASE)) <= 1e-6
    assert torch.equal(out, out.mT)  # upper triangle mirrored: exactly symmetric
    assert torch.equal(out, symmetric_matmul(X, config=cfg))  # fixed-order reduction: same bits every call


def test_split_partials_are_reduced_in_a_fixed_order(monkeypatch):
    """Three slices of K = 150 (64, 64 and 22 wide), summed in slice order: the same split gives the
    same bits on every call, whatever ran before it; the partials' buffer starts NaN-poisoned, so
    an element no slice wrote would show."""
    monkeypatch.setenv(workspace.FILL_VARIABLE, "nan")
    X = _randn(2, 40, 150, seed=4)
    cfg = VARIANTS["split3+persistent"]
    tiles, splits, k_per_split, programs = launch_shape(2, 40, 150, cfg, INTERPRETER_SMS)
    assert (tiles, splits, k_per_split) == (6, 3, 64) and programs == INTERPRETER_SMS
    first = symmetric_matmul(X, config=cfg)
    assert torch.isfinite(first).all() and rel_err(first, X.double() @ X.double().mT) <= FP32_TOL
    symmetric_matmul(_randn(2, 40, 150, seed=5), config=cfg)  # other data through the same allocator
    assert torch.equal(first, symmetric_matmul(X, config=cfg))


def test_the_split_sum_is_the_slices_products_added_in_slice_order():
    """Bit for bit, not within rounding: a slice's partial is the unsplit kernel's product over that
    slice of K (the same K steps from a zero accumulator, the last slice masked at K), and the split
    product is those partials added in fp32 in slice order, (P0 + P1) + P2, then the epilogue (alpha
    = 1: none). Another fixed order (the slices reversed) would still repeat its bits; not these."""
    X = _randn(1, 70, 150, seed=8)
    cfg = replace(BASE, split_k=3)
    _, splits, k_per_split, _ = launch_shape(1, 70, 150, cfg, INTERPRETER_SMS)
    assert (splits, k_per_split) == (3, 64)
    partials = [symmetric_matmul(X[..., s * k_per_split:(s + 1) * k_per_split].contiguous(), config=BASE)
                for s in range(splits)]
    assert not torch.equal((partials[0] + partials[1]) + partials[2], (partials[2] + partials[1]) + partials[0])
    assert torch.equal(symmetric_matmul(X, config=cfg), (partials[0] + partials[1]) + partials[2])


def _last_arrivals(tiles: int, splits: int, programs: int) -> list[int]:
    """Per tile, the slice whose program arrives last when the interpreter runs ``programs``
    persistent programs one after another, each striding over the items (slice fastest)."""
    order = [item for p in range(programs) for item in range(p, tiles * splits, programs)]
    return [max(range(splits), key=lambda s: order.index(t * splits + s)) for t in range(tiles)]


@pytest.mark.parametrize("shift", [0.0, 0.75])
def test_the_last_slice_to_arrive_sums_in_slice_order_and_resets_the_counters(shift):
    """Split products reduce in the launch itself: the last of a tile's slices to arrive (an integer
    counter, the only atomic) sums the tile's partials in slice order. Persistent programs make some
    tile's last arrival a slice other than its last; the bits still equal a plain launch's, where
    the last slice always arrives last — and every counter is back at zero for the next launch."""
    X = _randn(1, 70, 150, seed=6)
    D = symmetric_matmul(_randn(1, 70, 40, seed=7))
    plain, persistent = replace(BASE, split_k=3), replace(BASE, split_k=3, persistent=True)
    tiles, splits, _, programs = launch_shape(1, 70, 150, persistent, INTERPRETER_SMS)
    assert (tiles, splits, programs) == (6, 3, INTERPRETER_SMS)
    assert any(s != splits - 1 for s in _last_arrivals(tiles, splits, programs))
    counters = tsym.COUNTERS.get(X.device, tiles)
    outs = [symmetric_matmul(X, alpha=0.5, D=D, beta=-2.0, shift=shift, config=cfg) for cfg in (plain, persistent)]
    assert torch.equal(outs[0], outs[1])
    exact = 0.5 * X.double() @ X.double().mT - 2.0 * D.double() + shift * torch.eye(70, dtype=torch.float64)
    assert rel_err(outs[0], exact) <= FP32_TOL
    assert tsym.COUNTERS.get(X.device, tiles) is counters and not counters.any()


def test_arrival_counters_are_kept_per_stream_and_grow():
    """One zeroed array per (device, stream), reused while big enough, replaced by a bigger one."""
    counters = workspace.ArrivalCounters()
    cpu = torch.device("cpu")
    first = counters.kept(("dev", 1), cpu, 10)
    assert first.dtype == torch.int32 and first.numel() == workspace.ArrivalCounters.MIN_SIZE and not first.any()
    assert counters.kept(("dev", 1), cpu, 10) is first
    assert counters.kept(("dev", 2), cpu, 10) is not first  # another stream: its own counters
    bigger = counters.kept(("dev", 1), cpu, 3000)
    assert bigger.numel() == 3000 and not bigger.any() and counters.kept(("dev", 1), cpu, 5) is bigger


def test_arrival_counters_are_keyed_by_the_arrays_device(monkeypatch):
    """A CUDA array is keyed by the device it is allocated on and that device's current stream,
    not by whichever device is current: an array on cuda:1 is never handed to a cuda:0 launch."""
    counters, keys = workspace.ArrivalCounters(), []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)  # CPU torch
    monkeypatch.setattr(counters, "kept", lambda key, device, tiles: keys.append(key))
    counters.get(torch.device("cuda", 1), 10)
    counters.get(torch.device("cuda"), 10)  # no index: the current device's
    assert keys == [(1, 1001), (0, 1000)]


def test_a_split_launch_that_raises_forgets_its_counters(monkeypatch):
    """An interrupted launch may leave counters above zero; its array is dropped, so the next split
    launch starts from fresh zeros and gives the same bits as before."""
    X = _randn(1, 70, 150, seed=8)
    cfg = replace(BASE, split_k=3)
    before = symmetric_matmul(X, config=cfg)
    kept = tsym.COUNTERS.get(X.device, 6)

    def interrupted(kernel, grid, *args, **constexprs):
        args[5][0] = 2  # the counters: two slices of tile 0 arrived, then the run stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(tsym, "launch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        symmetric_matmul(X, config=cfg)
    monkeypatch.undo()
    assert tsym.COUNTERS.get(X.device, 6) is not kept
    assert torch.equal(symmetric_matmul(X, config=cfg), before)


@pytest.mark.parametrize("variant", ["split2", "tma+split2+persistent"])
def test_epilogue_with_second_operand_and_shift(variant):
    """alpha·X·Yᵀ + beta·D + shift·I for commuting symmetric X, Y (Gram NS's R·P and P = p(R))."""
    G = _randn(2, 50, 80, seed=1)
    R = (G @ G.mT / 80).contiguous()
    P = 2.0 * R @ R - 1.5 * R + 0.7 * torch.eye(50)
    out = symmetric_matmul(R, Y=P, alpha=2.0315, D=R, beta=-4.775, shift=3.4445, config=VARIANTS[variant])
    Rd, Pd = R.double(), P.double()
    exact = 2.0315 * Rd @ Pd - 4.775 * Rd + 3.4445 * torch.eye(50, dtype=torch.float64)
    assert rel_err(out, exact) <= FP32_TOL
    assert torch.equal(out, out.mT)  # diagonal tiles too, although R·P's diagonal tile is not exactly symmetric


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_operands_split_and_tma(dtype):
    X = _randn(2, 45, 130, seed=2).to(dtype)
    exact = X.double() @ X.double().mT
    for cfg in (VARIANTS["split3+persistent"], VARIANTS["tma+split2+persistent"]):
        out = symmetric_matmul(X, config=cfg)
        assert out.dtype == dtype and rel_err(out, exact) <= 2 * 2.0**-8


def test_transposed_views_take_the_pointer_path_with_the_same_bits():
    X = _randn(2, 45, 40, seed=3)
    assert descriptor(X.mT, (32, 32)) is None and descriptor(X, (32, 32)) is not None
    for cfg in (VARIANTS["tma"], VARIANTS["tma+split2+persistent"]):
        out = symmetric_matmul(X.mT, config=cfg)  # XᵀX through strides: no descriptor, no copy
        assert rel_err(out, X.double().mT @ X.double()) <= FP32_TOL
        assert torch.equal(out, symmetric_matmul(X.mT.contiguous(), config=cfg))


def test_unaligned_rows_fall_back():
    X = _randn(1, 20, 13)  # 13 fp32 = 52 bytes a row: TMA needs 16-byte aligned strides
    assert descriptor(X, (32, 32)) is None
    assert torch.equal(symmetric_matmul(X, config=VARIANTS["tma"]), symmetric_matmul(X, config=BASE))


@pytest.mark.parametrize("a", [3.4445, 0.0])
@pytest.mark.parametrize("m, n", [(33, 70), (40, 40)])
def test_ns_update_tma_and_persistent(m, n, a):
    """a = 0 is Gram NS's Q·X; TMA and persistence change no bit."""
    B, X = _randn(2, m, m, seed=1), _randn(2, m, n, seed=2)
    exact = a * X.double() + B.double() @ X.double()
    plain = ns_update(B, X, a, config=BASE)
    assert rel_err(plain, exact) <= FP32_TOL
    for cfg in (replace(BASE, tma=True), replace(BASE, tma=True, persistent=True), replace(BASE, persistent=True)):
        assert torch.equal(ns_update(B, X, a, config=cfg), plain)
    assert torch.equal(ns_update(B, X.mT.contiguous().mT, a, config=replace(BASE, tma=True)), plain)


def test_automatic_split_on_a_long_k():
    """With the interpreter's 4 pretend SMs, one 32-row tile over K = 2048 (64 steps) is split."""
    X = _randn(1, 30, 2048, seed=6)
    assert launch_shape(1, 30, 2048, BASE, INTERPRETER_SMS)[1] > 1
    out = symmetric_matmul(X)
    assert rel_err(out, X.double() @ X.double().mT) <= FP32_TOL
    assert rel_err(out, symmetric_matmul(X, config=replace(BASE, split_k=1))) <= 1e-6


@pytest.mark.parametrize("preset, restarts", [("keller", None), ("keller", [1, 3]), ("polar_express", [2])])
@pytest.mark.parametrize("shape", [(2, 20, 70), (1, 40, 100)])
def test_gram_driver_fp32_matches_fp64(shape, preset, restarts):
    G = _randn(*shape, seed=7)
    config = resolve_ns_config(preset, None, 1e-7, "gram", ns_gram_restarts=restarts)
    out = newton_schulz(G, config, torch.float32)
    assert rel_err(out, reference_ns(G, preset)) <= FP32_TOL
    # and the same schedule as muon_kernels.recurrence.gram, in fp64 through torch
    X = tns.normalize(G, config, torch.float32).double()
    ops = recurrence.MatmulOps(gram=lambda X: X @ X.mT, poly=lambda A, b, c: b * A + c * A @ A,
                               apply=lambda B, X, a: a * X + B @ X)
    assert rel_err(out, recurrence.gram(X, config.coefficients, config.gram_restarts(torch.float32), ops)) <= FP32_TOL


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float16])
def test_gram_driver_16bit_within_baseline(ns_dtype):
    G = _randn(2, 24, 96, seed=8)
    ref = reference_ns(G)
    out = newton_schulz(G, resolve_ns_config("keller", None, 1e-7, "gram"), ns_dtype)
    assert out.dtype == ns_dtype
    assert rel_err(out, ref) <= 2 * rel_err(plain_recurrence(G, ns_dtype), ref) + 1e-2


def test_gram_driver_scalar_map_on_diagonal_input():
    D, expected = scalar_map("keller")
    wide = torch.cat([D, torch.zeros(D.shape[0], 5)], dim=1)[None]
    out = newton_schulz(wide, resolve_ns_config("keller", None, 1e-7, "gram"), torch.float32)[0]
    torch.testing.assert_close(torch.diagonal(out).double(), expected, atol=2e-5, rtol=0)


def test_gram_driver_launches_and_allocations(monkeypatch):
    """5 steps restarted before 1 and 3: 17 products (standard NS's count), two workspace
    allocations (four m×m slots, one m×n partner), and every buffer NaN-poisoned first."""
    monkeypatch.setenv(workspace.FILL_VARIABLE, "nan")
    calls, allocations = [], []
    real_sym, real_update, real_empty = tns.symmetric_matmul, tns.ns_update, workspace.empty
    monkeypatch.setattr(tns, "symmetric_matmul", lambda *a, **k: calls.append("sym") or real_sym(*a, **k))
    monkeypatch.setattr(tns, "ns_update", lambda *a, **k: calls.append("update") or real_update(*a, **k))
    monkeypatch.setattr(workspace, "empty",
                        lambda shape, **k: allocations.append(tuple(shape)) or real_empty(shape, **k))
    X = tns.normalize(_randn(2, 20, 70, seed=9), resolve_ns_config("keller", 5, 1e-7), torch.float32)
    allocations.clear()
    with forced(symmetric=replace(BASE, split_k=1)):  # no partial buffers: count the driver's own
        out = gram_newton_schulz(X, [(3.4445, -4.775, 2.0315)] * 5, (1, 3))
    assert len(calls) == 17 and calls.count("update") == 3
    assert allocations == [(4, 2, 20, 20), (2, 20, 70)]
    assert torch.isfinite(out).all()


def _window(shape, pad=(2, 3)):
    """(out, inside): ``out`` a window of ``shape`` into a larger buffer filled with a sentinel,
    ``pad`` rows and columns of it on every side; ``inside`` marks the window in the buffer."""
    k, r, c = shape
    buffer = torch.full((k, r + 2 * pad[0], c + 2 * pad[1]), 12345.0)
    inside = torch.zeros_like(buffer, dtype=torch.bool)
    inside[:, pad[0]:pad[0] + r, pad[1]:pad[1] + c] = True
    return buffer[:, pad[0]:pad[0] + r, pad[1]:pad[1] + c], buffer, inside


@pytest.mark.parametrize("variant", ["plain", "split3+persistent", "tma+split2+persistent"])
def test_products_write_their_output_and_nothing_around_it(variant):
    """Outputs that are windows of a sentinel-filled buffer, sized off the 32-wide tiles: the last
    tiles' masks (rows, columns, a split's reduction and mirror) keep every write inside — the CPU
    would not fault on a write past the window, and a GPU writing its neighbour would not either."""
    cfg = BASE if variant == "plain" else VARIANTS[variant]
    X, B = _randn(2, 40, 70, seed=3), _randn(2, 40, 40, seed=4)
    for product, shape, expected in (
            (lambda out: symmetric_matmul(X, config=cfg, out=out), (2, 40, 40), symmetric_matmul(X, config=cfg)),
            (lambda out: ns_update(B, X, 3.4445, config=replace(cfg, split_k=0), out=out), (2, 40, 70),
             ns_update(B, X, 3.4445, config=replace(cfg, split_k=0)))):
        out, buffer, inside = _window(shape)
        product(out)
        assert torch.equal(out, expected)
        assert bool((buffer[~inside] == 12345.0).all())


def test_normalize_writes_its_output_and_nothing_past_it():
    """``normalize`` writes a contiguous output (rows 37 and columns 70 off the 16×32 interpreter
    tiles): nothing past its end, and no tile's spill into the next row survives."""
    G, config = _randn(2, 37, 70, seed=5), resolve_ns_config("keller", 5, 1e-7)
    flat = torch.full((2 * 37 * 70 + 97,), 12345.0)
    out = tns.normalize(G, config, torch.float32, out=flat[:2 * 37 * 70].view(2, 37, 70))
    assert torch.equal(out, tns.normalize(G, config, torch.float32))
    assert rel_err(out, G.double() / G.double().norm(dim=(1, 2), keepdim=True)) <= 4 * 2.0**-24
    assert bool((flat[2 * 37 * 70:] == 12345.0).all())
