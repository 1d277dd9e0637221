"""Property-based tests (hypothesis, derandomized, bounded): the optimizer step against an independent
fp64 reference over random shapes, options and gradient scales; state_dict round trips; the
independence of the matrices of one orthogonalize call."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # the test extra installs it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import muon_kernels as mk  # noqa: E402
from oracles import reference_ns  # noqa: E402

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=150,
                    suppress_health_check=[HealthCheck.too_slow])
FP32_TOL = 1e-4  # DESIGN.md §5: fp32 iteration vs the fp64 recurrence

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))
options = st.fixed_dictionaries({
    "lr": st.sampled_from([0.003, 0.02, 0.1]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99]),
    "nesterov": st.booleans(),
    "momentum_form": st.sampled_from(["ema", "sgd"]),
    "ns_coefficients": st.sampled_from(["keller", "quintic", "polar_express"]),
    "ns_steps": st.integers(0, 6),
    "eps": st.sampled_from([0.0, 1e-7]),
    "adjust_lr_fn": st.sampled_from([None, "match_rms_adamw", "spectral"]),
})


def _grads(shape, count, seed, exponent):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * 10.0**exponent for _ in range(count)]


def _reference_step(W, M, G, o):
    """DESIGN.md §1 in fp64, written from the formulas: momentum, Nesterov, NS, decay, update."""
    mu = o["momentum"]
    if o["momentum_form"] == "ema":
        M = mu * M + (1 - mu) * G
        U = (1 - mu) * G + mu * M if o["nesterov"] else M
    else:
        M = mu * M + G
        U = G + mu * M if o["nesterov"] else M
    O = reference_ns(U, o["ns_coefficients"], o["ns_steps"], o["eps"])
    rows, cols = W.shape
    scale = {None: math.sqrt(max(1, rows / cols)), "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols)),
             "spectral": math.sqrt(rows / cols)}[o["adjust_lr_fn"]]
    return W * (1 - o["lr"] * o["weight_decay"]) - o["lr"] * scale * O, M, o["lr"] * scale * O


@PROPERTY
@given(shape=shapes, o=options, steps=st.integers(1, 3), exponent=st.integers(-30, 30), seed=st.integers(0, 2**16))
def test_step_matches_an_fp64_reference(shape, o, steps, exponent, seed):
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    p = torch.nn.Parameter(W0.float())
    opt = mk.Muon([p], ns_dtype=torch.float32, **o)
    W, M = W0.clone(), torch.zeros_like(W0)
    for G in _grads(shape, steps, seed, exponent):
        p.grad = G.float()
        opt.step()
        W, M, delta = _reference_step(W, M, G.float().double(), o)
        # NS error (fp32 iteration) on this step's update, plus fp32 rounding of W and of the buffer.
        bound = FP32_TOL * delta.norm() * steps + 8 * 2.0**-24 * (W.norm() + delta.norm()) * steps
        assert (p.double() - W).norm() <= bound + 1e-30, (p, W)
        assert torch.isfinite(p).all()


@PROPERTY
@given(o=options, before=st.integers(1, 3), after=st.integers(1, 2), seed=st.integers(0, 2**16),
       ns_dtype=st.sampled_from([torch.float32, torch.bfloat16]), tensor_lr=st.booleans())
def test_state_dict_round_trip_resumes_bit_identically(o, before, after, seed, ns_dtype, tensor_lr):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 9))
    lr = torch.tensor(o["lr"]) if tensor_lr else o["lr"]
    opt = mk.Muon(mk.param_groups(model), **{**o, "lr": lr}, ns_dtype=ns_dtype)

    def step(m, optimizer, k):
        g = torch.Generator().manual_seed(seed * 10 + k)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()

    for k in range(before):
        step(model, opt, k)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = mk.Muon(mk.param_groups(resumed_model), **{**o, "lr": lr}, ns_dtype=ns_dtype)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for k in range(before, before + after):
        step(model, opt, k)
        step(resumed_model, resumed, k)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(resumed.state[q][key], value)


@PROPERTY
@given(k=st.integers(2, 5), shape=shapes, member=st.integers(0, 4), seed=st.integers(0, 2**16),
       poison=st.sampled_from(["nan", "inf", "zero", "1e30", "1e-30"]),
       ns_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_each_matrix_of_a_batch_is_independent(k, shape, member, seed, poison, ns_dtype):
    G = torch.randn(k, *shape, generator=torch.Generator().manual_seed(seed))
    member %= k
    H = G.clone()
    H[member] = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}.get(poison, 0.0)
    if poison in ("1e30", "1e-30"):
        H[member] = G[member] * float(poison)
    out_g = mk.orthogonalize(G, ns_dtype=ns_dtype, eps=0.0)
    out_h = mk.orthogonalize(H, ns_dtype=ns_dtype, eps=0.0)
    others = [i for i in range(k) if i != member]
    assert torch.equal(out_g[others], out_h[others])
    if poison in ("1e30", "1e-30"):  # a rescaled member orthogonalizes like the original
        torch.testing.assert_close(out_h[member], out_g[member], rtol=0, atol=1e-5 if ns_dtype == torch.float32 else 0.02)
    elif poison == "zero":
        assert torch.equal(out_h[member], torch.zeros(shape))
    else:
        assert out_h[member].isnan().any()
