"""Property-based tests of the Triton path on the CPU interpreter (hypothesis, derandomized, few
examples: the interpreter runs one program at a time)."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # the test extra installs it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import muon_kernels as mk  # noqa: E402
from muon_kernels.ns_config import resolve_ns_config  # noqa: E402
from muon_kernels.triton_kernels.newton_schulz import newton_schulz  # noqa: E402
from muon_kernels.triton_kernels.small_newton_schulz import small_newton_schulz  # noqa: E402
from oracles import reference_ns, rel_err  # noqa: E402

INTERPRETED = settings(derandomize=True, deadline=None, database=None, max_examples=25,
                       suppress_health_check=[HealthCheck.too_slow])


@INTERPRETED
@given(k=st.integers(1, 3), m=st.integers(1, 40), n=st.integers(1, 40), exponent=st.integers(-30, 30),
       path=st.sampled_from(["symmetric", "small"]), preset=st.sampled_from(["keller", "quintic", "polar_express"]),
       steps=st.integers(0, 5), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_newton_schulz_matches_the_fp64_recurrence(k, m, n, exponent, path, preset, steps, transposed, seed):
    m, n = min(m, n), max(m, n)
    G = torch.randn(k, n, m, generator=torch.Generator().manual_seed(seed)).mT if transposed else \
        torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed))
    G = G * 10.0**exponent
    config = resolve_ns_config(preset, steps, 0.0)
    out = (newton_schulz if path == "symmetric" else small_newton_schulz)(G, config, torch.float32)
    assert out.is_contiguous() and out.shape == (k, m, n)
    assert rel_err(out, reference_ns(G.double(), preset, steps, 0.0)) <= 1e-4


@INTERPRETED
@given(rows=st.integers(1, 24), cols=st.integers(1, 24), momentum=st.sampled_from([0.0, 0.9, 0.95]),
       nesterov=st.booleans(), form=st.sampled_from(["ema", "sgd"]), weight_decay=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2**16))
def test_fused_triton_step_matches_the_torch_backend(rows, cols, momentum, nesterov, form, weight_decay, seed):
    results = {}
    for backend in ("torch", "triton"):
        p = torch.nn.Parameter(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
        opt = mk.Muon([p], backend=backend, momentum=momentum, nesterov=nesterov, momentum_form=form,
                      weight_decay=weight_decay, lr=0.05, ns_dtype=torch.float32, ns_steps=3)
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(2):
            p.grad = torch.randn(rows, cols, generator=g)
            opt.step()
        results[backend] = (p.detach(), opt.state[p]["momentum_buffer"])
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-6, atol=1e-7)
