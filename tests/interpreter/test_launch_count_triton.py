"""Every kernel a Triton-backend step launches, counted on the CPU interpreter (tests/launch_count.py),
and constant in the number of layers: one symmetric-path bucket and one small-path bucket.

The GPU twin (tests/gpu/test_triton_gpu.py::test_launch_count_is_constant_per_bucket) counts the
same step with the CUDA profiler; the list is in README.md ("Kernel launches of one step").
Per step, with ``ns_steps`` = s:
- symmetric bucket: fused momentum, sum of squares, scale-and-cast, s × (X·Xᵀ, b·A + c·A·A,
  a·X + B·X), fused update: 4 + 3·s;
- small bucket: fused momentum, sum of squares, scale-and-cast, the one-kernel NS, fused update: 5.
Under ``MUON_KERNELS_DEBUG_FILL=nan`` every work buffer taken from ``workspace.empty`` is also
filled (one ``fill_`` each, and again each time it is reused): the stack, the normalized X, its
partials and per-matrix norms, and every product's output — one call's A = X·Xᵀ, B = p(A) and the
two m×n buffers a·X + B·X alternates between, refilled before each product (4 + 3·s for the
symmetric bucket; stack, X, partials, norms and the output for the small one: 5).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import muon_kernels as mk
from launch_count import LaunchCounter

STEPS = 5
# fp32 iteration: (32, 256) is over the one-kernel budget (symmetric path), (16, 64) within it.
SYMMETRIC, SMALL = (32, 256), (16, 64)

TRITON_LAUNCHES = Counter({
    "triton:_fused_momentum_kernel": 2,
    "triton:_sum_squares_kernel": 2,
    "triton:_scale_cast_kernel": 2,
    "triton:_symmetric_matmul_kernel": 2 * STEPS,
    "triton:_ns_update_kernel": STEPS,
    "triton:_small_newton_schulz_kernel": 1,
    "triton:_fused_apply_update_kernel": 2,
})
# Work buffers per step (each poisoned under the debug fill): the symmetric bucket's 4 + 3 per NS step, the
# small bucket's 5; each bucket's normalization takes two of them (partials, per-matrix norms).
WORK_BUFFERS = (4 + 3 * STEPS) + 5


def _count(layers: int, monkeypatch, fill: bool) -> LaunchCounter:
    if fill:
        monkeypatch.setenv("MUON_KERNELS_DEBUG_FILL", "nan")
    else:
        monkeypatch.delenv("MUON_KERNELS_DEBUG_FILL", raising=False)
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [SYMMETRIC, SMALL] * layers]
    opt = mk.Muon(ps, backend="triton", ns_steps=STEPS, ns_dtype=torch.float32)
    assert [(r.backend, r.path) for r in opt.plan()][:2] == [("triton", "symmetric"), ("triton", "small")]
    for _ in range(2):  # the first step builds the cached tables; the second is the steady state
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        with LaunchCounter() as counter:
            opt.step()
    return counter


@pytest.mark.parametrize("fill", [False, True], ids=["plain", "debug-fill"])
def test_launches_per_step_are_the_design_list_whatever_the_layer_count(monkeypatch, fill):
    counts = [_count(layers, monkeypatch, fill) for layers in (1, 3)]
    expected = TRITON_LAUNCHES + (Counter({"torch:fill_": WORK_BUFFERS}) if fill else Counter())
    for c in counts:
        assert c.by_name() == expected, c.launches
    assert counts[0].total == counts[1].total == (4 + 3 * STEPS) + 5 + (WORK_BUFFERS if fill else 0)
    # The order of one bucket: momentum, normalization, the recurrence, the update.
    names = [name for kind, name in counts[0].launches if kind == "triton"]
    assert names[:3] == ["_fused_momentum_kernel", "_sum_squares_kernel", "_scale_cast_kernel"]
    assert names[3 : 3 + 3 * STEPS] == ["_symmetric_matmul_kernel", "_symmetric_matmul_kernel",
                                        "_ns_update_kernel"] * STEPS
    assert names[3 + 3 * STEPS] == "_fused_apply_update_kernel"


def test_the_counter_sees_torch_kernels_and_skips_views():
    """The counter itself: arithmetic, fills and copies count; views, empty and item() do not."""
    x = torch.randn(4, 4)
    with LaunchCounter() as c:
        y = torch.empty(4, 4)
        y.fill_(1.0)
        z = x.t().unsqueeze(0)[0, :3]  # views
        y.add_(x)
        y.copy_(x)
        float(x.sum())
    assert [name for _, name in c.launches] == ["fill_", "add_", "copy_", "sum"], c.launches
    del z


@pytest.mark.parametrize("options, extra", [
    ({"adaptive": "normuon"}, {"triton:_variant_statistics_kernel": 1, "triton:_variant_factors_kernel": 1}),
    ({"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0},
     {"triton:_variant_statistics_kernel": 1, "triton:_variant_factors_kernel": 1}),
])
def test_variants_add_their_launches_per_bucket_not_per_parameter(monkeypatch, options, extra):
    """NorMuon / hyperball: the statistics pass and one launch that adds the partial sums up and
    forms the per-matrix factors — where the same math as torch ops took ~30 small launches per
    bucket. Constant in the layer count. The hyperball's radii vector was gathered (one cat) by the
    first step and is reused by the second, the one counted (variants.radius_vector)."""
    monkeypatch.delenv("MUON_KERNELS_DEBUG_FILL", raising=False)
    plain = Counter({"triton:_fused_momentum_kernel": 1, "triton:_sum_squares_kernel": 1,
                     "triton:_scale_cast_kernel": 1, "triton:_symmetric_matmul_kernel": 2 * STEPS,
                     "triton:_ns_update_kernel": STEPS, "triton:_fused_apply_update_kernel": 1})  # one bucket
    g = torch.Generator().manual_seed(0)
    for layers in (2, 4):
        ps = [torch.nn.Parameter(torch.randn(SYMMETRIC, generator=g)) for _ in range(layers)]
        opt = mk.Muon(ps, backend="triton", ns_steps=STEPS, ns_dtype=torch.float32, **options)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            with LaunchCounter() as counter:
                opt.step()
        assert counter.by_name() == plain + Counter(extra), counter.launches
