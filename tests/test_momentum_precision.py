"""Low-precision momentum: bf16 with stochastic rounding and int8 (blocks of 256, fp32 scales),
checked against definitions written here from the bits (not from the package's code), for
unbiasedness, against fp64 momentum over 12 steps, and for exact resumes."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import muon_kernels as mk
from muon_kernels.workspace import Scratch
from muon_kernels import momentum_precision as mp
from muon_kernels.random_bits import random_bits
import non_finite_momentum
import stochastic_draws

aten = torch.ops.aten


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(toward zero, away from zero) bf16 neighbours of fp32 x, from the bit pattern."""
    raw = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    down = raw & 0xFFFF0000
    up = down + 0x10000
    to_f = lambda r: torch.where(r >= 2**31, r - 2**32, r).to(torch.int32).view(torch.float32)  # noqa: E731
    return to_f(down), to_f(up)


def test_stochastic_bf16_picks_a_neighbour_with_the_right_probability():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 10
    down, up = _bf16_neighbours(x)
    frac = ((x.view(torch.int32).to(torch.int64) & 0xFFFF).to(torch.float64)) / 2**16  # P(round away from zero)
    hits = torch.zeros(4096, dtype=torch.float64)
    draws = 400
    for step in range(draws):
        bits = random_bits(7, torch.tensor(step), 4096, "cpu")
        r = mp.stochastic_bf16(x, bits).float()
        assert bool(((r == down) | (r == up)).all())
        hits += (r == up).double() * (up != down).double()
    # Each element: a binomial(400, frac) count; the mean over 4096 elements is within 4 sigma.
    err = (hits / draws - frac).mean().abs().item()
    assert err <= 4 * (0.25 / draws / 4096) ** 0.5
    # Exactly representable values never move.
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(mp.stochastic_bf16(exact, random_bits(1, torch.tensor(3), 4096, "cpu")).float(), exact)


def _reference_step(q, scale, bf16, g, *, mu, bits, form):
    """One low-precision momentum step from the definitions (module docstring), element by element
    semantics in plain torch: (stored buffer, its scales, U)."""
    rows, cols = g.shape
    if bf16 is not None:
        old = bf16.float()
    else:
        old = q.float() * scale.repeat_interleave(256, dim=1)[:, :cols]
    m = torch.lerp(old, g, 1 - mu) if form == "ema" else mu * old + g
    if bf16 is not None:  # add 16 random bits below the bf16 mantissa, truncate
        raw = m.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        r = (raw + (bits & 0xFFFF)) & 0xFFFF0000
        stored = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32).view(torch.float32)
        new_q, new_scale = stored.to(torch.bfloat16), None
    else:
        blocks = -(-cols // 256)
        padded = torch.zeros(rows, blocks * 256)
        padded[:, :cols] = m
        # max|m| / 127 as a product by fl32(1/127): the same rounding on every device (a GPU's torch
        # divides by a number as a product by its reciprocal, a CPU's divides)
        new_scale = padded.abs().view(rows, blocks, 256).amax(dim=2) * torch.tensor(1 / 127, dtype=torch.float32)
        per = torch.where(new_scale > 0, new_scale, torch.ones(())).repeat_interleave(256, dim=1)[:, :cols]
        y = m / per
        y = torch.floor(y + 0.5) if bits is None else torch.floor(y + (bits >> 8).float() * 2.0**-24)
        y = y.clamp(-127, 127)
        new_q = y.to(torch.int8)
        stored = y * new_scale.repeat_interleave(256, dim=1)[:, :cols]
    # sgd: torch.optim.SGD's Nesterov blend, grad.add(buf, alpha=momentum): g + μ·M in one rounding
    u = torch.lerp(g, stored, mu) if form == "ema" else torch.add(g, stored, alpha=mu)
    return new_q, new_scale, u


class _GpuDivision(TorchDispatchMode):
    """A GPU's torch arithmetic for a division by a Python number, on the CPU: ATen's CUDA kernel
    (BinaryDivTrueKernel.cu) multiplies by the reciprocal, fl(1/b) in the tensor's math type (fp32
    for fp32, bf16 and fp16), where a CPU divides. The torch backend on a GPU is the kernels' oracle,
    so its bits must not depend on which of the two the device does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in (aten.div.Tensor, aten.div_.Tensor, aten.div.out) and isinstance(args[1], (int, float))
                and args[0].is_floating_point()):
            math_dtype = torch.float64 if args[0].dtype == torch.float64 else torch.float32
            inverse = float(torch.tensor(1.0 / args[1], dtype=math_dtype))
            mul = {aten.div.Tensor: aten.mul.Tensor, aten.div_.Tensor: aten.mul_.Tensor, aten.div.out: aten.mul.out}
            return mul[func](args[0], inverse, **kwargs)
        return func(*args, **kwargs)


def test_the_gpu_division_emulation_differs_from_a_cpu_division():
    """The emulation is live: a division by 127 rounds otherwise in ~4% of fp32 values."""
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 10
    with _GpuDivision():
        emulated = x / 127.0
    assert torch.equal(emulated, x * torch.tensor(1 / 127, dtype=torch.float32))
    assert 0.01 < (emulated != x / 127.0).float().mean().item() < 0.1


@pytest.mark.parametrize("form", ["ema", "sgd"])
@pytest.mark.parametrize("kind", ["int8", "int8-stochastic", "bf16-stochastic"])
@pytest.mark.parametrize("stacked", [False, True], ids=["tensor-by-tensor", "stacked-chunks"])
@pytest.mark.parametrize("division", ["cpu", "gpu"])
def test_momentum_update_is_its_definition_bit_for_bit(monkeypatch, form, kind, stacked, division):
    """Three steps of five tensors (rows of 600: a padded block; of 512: whole blocks; a shard's rows
    at an offset), against ``_reference_step``: buffers, scales and U bit for bit. ``stacked``: the
    chunks a GPU runs (same-shape tensors as one matrix, two tensors per chunk here), on the CPU;
    otherwise each tensor alone, as a CPU steps its large ones. ``division="gpu"``: the package's
    steps run with a GPU's division by a number (``_GpuDivision``)."""
    device_arithmetic = _GpuDivision() if division == "gpu" else contextlib.nullcontext()
    if stacked:
        monkeypatch.setattr(mp, "_chunks", mp.stacked_chunks)
        monkeypatch.setattr(mp, "CHUNK_ELEMENTS", 2 * 3 * 600)
    else:  # each tensor alone, as a CPU steps its large ones (the Nesterov blend written into its slot)
        monkeypatch.setattr(mp, "CPU_ALONE_ELEMENTS", 1)
    int8, stochastic = kind.startswith("int8"), kind.endswith("stochastic")
    mode = mp.LowPrecision(int8, stochastic)
    g = torch.Generator().manual_seed(4)
    shapes = [(3, 600), (3, 600), (3, 600), (2, 512), (2, 512)]
    offsets = [0, 0, 1800, 0, 1024]
    seeds = [11, 12, 13, 14, 15]
    dtype = torch.int8 if int8 else torch.bfloat16
    bufs = [torch.zeros(s, dtype=dtype) for s in shapes]
    scales = [torch.zeros(s[0], -(-s[1] // 256)) for s in shapes]
    ref = [(b.clone(), sc.clone()) for b, sc in zip(bufs, scales)]
    for step in range(1, 4):
        grads = [torch.randn(s, generator=g) * 3 for s in shapes]
        outs = [torch.full(s, float("nan")) for s in shapes]
        with device_arithmetic:
            mp.momentum_update(bufs, grads, scales, [torch.tensor(step)] * 5, seeds, momentum=0.9, nesterov=True,
                               form=form, mode=mode, outs=outs, offsets=offsets)
            fresh = mp.momentum_update([b.clone() for b in bufs], grads, [sc.clone() for sc in scales],
                                       [torch.tensor(step)] * 5, seeds, momentum=0.9, nesterov=True, form=form,
                                       mode=mode, offsets=offsets)  # U returned: its own tensors
        for i, s in enumerate(shapes):
            bits = stochastic_draws.bits(seeds[i], step, s[0] * s[1], offsets[i]).view(s) if stochastic else None
            q, sc = ref[i]
            new_q, new_scale, u = _reference_step(q if int8 else None, sc, None if int8 else q, grads[i], mu=0.9,
                                                  bits=bits, form=form)
            ref[i] = (new_q, new_scale if int8 else sc)
            assert torch.equal(bufs[i], new_q), (step, i)
            if int8:
                assert torch.equal(scales[i], new_scale), (step, i)
            assert torch.equal(outs[i], u), (step, i)
        for i in range(5):  # the previous step's U, unchanged by later chunks
            assert fresh[i].data_ptr() not in {f.data_ptr() for j, f in enumerate(fresh) if j != i}


@pytest.mark.parametrize("stochastic", [False, True])
def test_int8_blocks_bound_the_error_by_their_own_maximum(stochastic):
    """Blocks of 256 along each row (rows of 600: two full blocks and one of 88)."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(3, 600, generator=g)
    m[1, 10] = 1000.0  # an outlier costs precision in its own block only
    bits = random_bits(3, torch.tensor(1), m.numel(), "cpu").view(3, 600) if stochastic else None
    q, scale = mp.quantize(m, bits)
    assert q.dtype == torch.int8 and q.shape == (3, 600) and scale.shape == (3, 3)
    back = mp.dequantize(q, scale)
    for r in range(3):
        for b, (lo, hi) in enumerate([(0, 256), (256, 512), (512, 600)]):
            block = m[r, lo:hi]
            step = block.abs().max() / 127  # one quantization level of this block
            bound = (step if stochastic else step / 2) * (1 + 1e-6)
            assert (back[r, lo:hi] - block).abs().max() <= bound
            assert scale[r, b] == pytest.approx(block.abs().max().item() / 127, rel=1e-6)
    assert (back[1, 256:] - m[1, 256:]).abs().max() < 0.05  # the outlier's row keeps a fine grid elsewhere


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("options", [{}, {"momentum_rounding": "stochastic"}, {"momentum_form": "sgd"}])
def test_a_non_finite_gradient_keeps_its_int8_block_non_finite(value, options):
    """A NaN or an infinity in one block of the gradient: that block's scale is NaN (inf the first
    step for an infinity), every value of it dequantizes to NaN at this step and the next — the
    momentum stays non-finite, as an fp32 momentum would, never a finite -127·scale — and its NaN is
    stored as 0; the other three blocks store what a run without it stores."""
    states = non_finite_momentum.steps("torch", "cpu", value, options)
    clean = non_finite_momentum.steps("torch", "cpu", None, options)
    row, col = non_finite_momentum.BAD
    block = (row, col // mp.QUANT_BLOCK)  # the bad element's block: (row, block of the row)
    for step, ((q, scale), (clean_q, clean_scale)) in enumerate(zip(states, clean)):
        assert bool(scale[block].isnan()) if step or value != value else scale[block].item() == float("inf")
        assert bool(mp.dequantize(q, scale).view(*scale.shape, mp.QUANT_BLOCK)[block].isnan().all())
        assert q[non_finite_momentum.BAD].item() == 0
        others = torch.ones_like(scale, dtype=torch.bool)
        others[block] = False
        blocks = lambda x: x.view(*scale.shape, mp.QUANT_BLOCK)[others]  # noqa: E731
        assert torch.equal(scale[others], clean_scale[others])
        assert torch.equal(blocks(q), blocks(clean_q))
    # the reference stores a NaN as 0 through torch's float → int8 conversion: 0 on this device too,
    # on its vectorized path and the scalar one of short tensors and tails
    assert not any(torch.full((n,), float("nan")).to(torch.int8).any() for n in (1, 7, 1024 + 3))


def test_stochastic_int8_is_unbiased():
    m = torch.full((1, 256), 0.3)
    m[0, 0] = 1.0  # scale 1/127: 0.3 sits between levels 38 and 39 (0.3·127 = 38.1)
    total = torch.zeros(1, 256, dtype=torch.float64)
    for step in range(2000):
        q, scale = mp.quantize(m, random_bits(2, torch.tensor(step), 256, "cpu").view(1, 256))
        total += mp.dequantize(q, scale).double()
    mean = (total / 2000)[0, 1:].mean().item()
    assert abs(mean - 0.3) < 4 * (0.1 * 0.9 / 2000 / 255) ** 0.5 / 127 + 1e-6


def _train(W0, grads, **options):
    W = nn.Parameter(W0.clone())
    opt = mk.Muon([W], lr=0.05, ns_dtype=torch.float32, backend="torch", weight_decay=0.0, **options)
    for G in grads:
        W.grad = G.clone()
        opt.step()
    return W.detach(), opt


# Error relative to torch's own bf16 momentum (nearest rounding): stochastic rounding's error is
# up to one ulp instead of half (2×, and more steps' errors add: 4×); int8 keeps 127 levels of its
# block's max, a step of max/127 against bf16's |m|·2^-8: (max/|m|)·2 ≈ 8× for Gaussian blocks of
# 256 (max ≈ 3σ, mean |m| ≈ 0.8σ), 16× with stochastic rounding.
LOW_PRECISION_FACTORS = [
    ({"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"}, 4),
    ({"momentum_dtype": "int8"}, 8),
    ({"momentum_dtype": "int8", "momentum_rounding": "stochastic"}, 16),
]


@pytest.mark.parametrize("options, factor", LOW_PRECISION_FACTORS)
def test_low_precision_momentum_tracks_fp64_momentum(options, factor):
    """12 steps against fp64 momentum, bounded by a multiple of what torch's bf16 momentum costs."""
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(32, 48, generator=g)
    grads = [torch.randn(32, 48, generator=g) for _ in range(12)]
    exact, _ = _train(W0, grads, momentum_dtype=torch.float64)
    bf16, _ = _train(W0, grads, momentum_dtype=torch.bfloat16)
    low, opt = _train(W0, grads, **options)
    disp = (exact - W0).norm()
    bf16_err = ((bf16 - exact).norm() / disp).item()
    err = ((low - exact).norm() / disp).item()
    assert err <= factor * bf16_err, (err, bf16_err)
    assert err > 0  # it really is rounded
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    assert buf.dtype == (torch.int8 if options["momentum_dtype"] == "int8" else torch.bfloat16)


def test_stochastic_rounding_keeps_updates_nearest_rounding_loses():
    """M = 256 in bf16 (ulp 2): an EMA step toward 258 adds 0.1, which round-to-nearest drops every
    time; stochastic rounding keeps it on average."""
    results = {}
    for rounding in ("nearest", "stochastic"):
        W = nn.Parameter(torch.zeros(64, 64))
        opt = mk.Muon([W], lr=0.0, momentum=0.95, momentum_dtype=torch.bfloat16, momentum_rounding=rounding)
        W.grad = torch.full((64, 64), 256.0)
        opt.step()  # M = 0.05·256 = 12.8 → push it to 256
        opt.state[W]["momentum_buffer"].fill_(256.0)
        for _ in range(20):
            W.grad = torch.full((64, 64), 258.0)
            opt.step()
        results[rounding] = opt.state[W]["momentum_buffer"].float().mean().item()
    exact = 258 - 2 * 0.95**20
    assert results["nearest"] == 256.0
    assert abs(results["stochastic"] - exact) < 0.1


@pytest.mark.parametrize("options", [
    {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"},
    {"momentum_dtype": "int8", "momentum_rounding": "stochastic"},
])
def test_resume_is_bit_identical(options):
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(24, 40, generator=g)
    grads = [torch.randn(24, 40, generator=g) for _ in range(8)]
    W = nn.Parameter(W0.clone())
    opt = mk.Muon([W], lr=0.05, **options)
    for G in grads[:4]:
        W.grad = G.clone()
        opt.step()
    saved, W_saved = copy.deepcopy(opt.state_dict()), W.detach().clone()
    for G in grads[4:]:
        W.grad = G.clone()
        opt.step()
    W2 = nn.Parameter(W_saved)
    opt2 = mk.Muon([W2], lr=0.05, **options)
    opt2.load_state_dict(saved)
    for G in grads[4:]:
        W2.grad = G.clone()
        opt2.step()
    assert torch.equal(W.detach(), W2.detach())
    assert opt2.state[W2]["momentum_step"].dtype == torch.int64 and int(opt2.state[W2]["momentum_step"]) == 8


def test_int8_momentum_uses_a_quarter_of_fp32_memory():
    W = nn.Parameter(torch.randn(384, 1536))  # fp32 NS: a bf16 one on a CPU took 20 s of this test
    opt = mk.Muon([W], momentum_dtype="int8", ns_dtype=torch.float32)
    W.grad = torch.randn_like(W)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[W].values())
    assert nbytes * 3.9 <= W.numel() * 4


def test_switching_momentum_dtype_converts_the_buffer():
    W = nn.Parameter(torch.randn(16, 32))
    opt = mk.Muon([W], lr=0.05)
    W.grad = torch.randn_like(W)
    opt.step()
    fp32 = opt.state[W]["momentum_buffer"].clone()
    opt.param_groups[0]["momentum_dtype"] = "int8"
    W.grad = torch.zeros_like(W)
    opt.step()
    back = mp.dequantize(opt.state[W]["momentum_buffer"], opt.state[W]["momentum_scale"])
    assert (back - 0.95 * fp32).abs().max() <= fp32.abs().max() / 127


def test_converting_an_fsdp2_shard_keeps_its_sharding():
    """``convert`` on DTensor state (an FSDP2 parameter's momentum; one gloo rank here): the local
    rows convert exactly as a plain tensor's, the buffer and its scales stay DTensors sharded like
    the parameter, and converting back restores the values within int8's step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(6)
        values = torch.randn(4, 300, generator=g).to(torch.bfloat16)
        p = distribute_tensor(torch.zeros(4, 300), mesh, [Shard(0)])
        state = {"momentum_buffer": distribute_tensor(values.clone(), mesh, [Shard(0)])}
        plain = {"momentum_buffer": values.clone()}
        q = mp.convert(state, p, torch.int8)
        ref_q = mp.convert(plain, values, torch.int8)
        assert isinstance(q, DTensor) and isinstance(state["momentum_scale"], DTensor)
        assert q.placements == p.placements and q.shape == (4, 300) and q.dtype == torch.int8
        assert state["momentum_scale"].shape == (4, 2)
        assert torch.equal(q.to_local(), ref_q) and torch.equal(state["momentum_scale"].to_local(),
                                                                plain["momentum_scale"])
        state["momentum_buffer"] = q
        back = mp.convert(state, p, torch.bfloat16)
        assert isinstance(back, DTensor) and "momentum_scale" not in state and back.dtype == torch.bfloat16
        step = values.float().abs().amax(dim=1, keepdim=True) / 127
        assert ((back.to_local().float() - values.float()).abs() <= step * 0.51 + 2e-2 * values.float().abs()).all()
    finally:
        dist.destroy_process_group()


def test_a_step_under_inference_mode_leaves_later_steps_working():
    """The work buffers a CPU keeps between calls are never made under inference mode (a tensor made
    there cannot be written outside it): orthogonalize and a low-precision momentum step, first
    inside ``torch.inference_mode()``, then outside."""
    g = torch.Generator().manual_seed(7)
    G = torch.randn(64, 32, generator=g)
    with torch.inference_mode():
        inside = mk.orthogonalize(G, ns_dtype=torch.bfloat16)
    assert torch.equal(mk.orthogonalize(G, ns_dtype=torch.bfloat16), inside)
    scratch = Scratch(torch.device("cpu"))
    args = dict(momentum=0.9, nesterov=True, form="ema", mode=mp.LowPrecision(True, True), scratch=scratch)
    bufs, scales = [torch.zeros(64, 32, dtype=torch.int8)], [torch.zeros(64, 1)]
    with torch.inference_mode():
        mp.momentum_update([b.clone() for b in bufs], [G], [s.clone() for s in scales], [torch.tensor(1)], [3],
                           outs=[torch.empty(64, 32)], **args)
    mp.momentum_update(bufs, [G], scales, [torch.tensor(1)], [3], outs=[torch.empty(64, 32)], **args)


@pytest.mark.parametrize("options, message", [
    ({"momentum_rounding": "stochastic"}, "momentum_rounding='stochastic' rounds into a low-precision momentum"),
    ({"momentum_dtype": torch.float16, "momentum_rounding": "stochastic"}, "momentum_dtype=torch.bfloat16 or 'int8'"),
    ({"momentum_rounding": "up"}, "momentum_rounding must be one of"),
    ({"momentum_dtype": "int4"}, "momentum_dtype must be None"),
])
def test_bad_momentum_options_name_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        mk.Muon([nn.Parameter(torch.randn(16, 8))], **options)


def test_int8_split_pieces_keep_whole_blocks():
    """Row pieces hold whole rows (whole blocks); a column piece must start and end on a block."""
    d = 16
    W = nn.Parameter(torch.randn(3 * d, d))
    opt = mk.Muon([{"params": [W], "split_sizes": (d, d, d)}], lr=0.05, momentum_dtype="int8")
    W.grad = torch.randn_like(W)
    opt.step()
    assert opt.state[W]["momentum_scale"].shape == (3 * d, 1)
    stored = nn.Parameter(torch.randn(8, 3 * 256))  # GPT-2-like c_attn (in, out) with 256-wide blocks
    mk.Muon([{"params": [stored], "split_sizes": (256,) * 3, "matrix_view": "transposed"}], momentum_dtype="int8")
    with pytest.raises(ValueError, match=r"parameter 'c'.*split piece \[0, 100\) of the columns"):
        mk.Muon([{"params": [("c", nn.Parameter(torch.randn(8, 300)))], "split_sizes": (100, 100, 100),
                  "matrix_view": "transposed"}], momentum_dtype="int8")


def test_int8_turned_on_after_construction_checks_the_pieces_at_the_step():
    """The same refusal when momentum_dtype="int8" is set on the group later: at the step, naming the
    group and the parameter, with nothing modified."""
    p = nn.Parameter(torch.randn(8, 300))
    opt = mk.Muon([{"params": [("c", p)], "split_sizes": (100, 100, 100), "matrix_view": "transposed"}])
    p.grad = torch.randn_like(p)
    opt.step()
    before, momentum = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    opt.param_groups[0]["momentum_dtype"] = "int8"
    with pytest.raises(ValueError, match=r"param group 0: parameter 'c'.*split piece \[0, 100\) of the columns.*"
                                         r"nothing was modified"):
        opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["momentum_buffer"], momentum)


def test_plan_names_the_momentum_precision():
    opt = mk.Muon([nn.Parameter(torch.randn(16, 8))], momentum_dtype="int8", momentum_rounding="stochastic")
    assert "int8 momentum (blocks of 256), stochastic rounding" in opt.plan()[0].why
