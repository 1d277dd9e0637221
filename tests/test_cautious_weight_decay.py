"""Cautious weight decay (Chen et al. 2025, arXiv 2510.12402): the decoupled decay is applied only to
the entries where the parameter and the update direction agree in sign,

    W ← W − lr·(scale·O + wd·𝟙[W ⊙ O ≥ 0]·W),

against an fp64 reference written from that formula (momentum, the fp64 Newton–Schulz recurrence,
the masked decay), 12 steps, on the torch backend; the fused kernels are checked against the torch
backend on the interpreter (tests/interpreter) and compiled for every arch (test_triton_aot.py,
test_cuda_extension.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels.backends import torch_backend
from oracles import reference_ns

STEPS = 12


def _reference(W0: torch.Tensor, grads: list[torch.Tensor], *, lr, wd, mu, cautious: bool) -> torch.Tensor:
    W, M = W0.double().clone(), torch.zeros_like(W0, dtype=torch.float64)
    rows, cols = W0.shape
    scale = max(1.0, rows / cols) ** 0.5
    for G in grads:
        G = G.double()
        M = mu * M + (1 - mu) * G
        O = reference_ns((1 - mu) * G + mu * M, "keller", 5)
        mask = (W * O >= 0).double() if cautious else torch.ones_like(W)
        W = W - lr * (scale * O + wd * mask * W)
    return W


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_matches_the_formula_over_twelve_steps(shape):
    g = torch.Generator().manual_seed(11)
    W0 = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) for _ in range(STEPS)]
    results = {}
    for mode in ("decoupled", "cautious"):
        W = nn.Parameter(W0.clone())
        opt = mk.Muon([W], lr=0.05, weight_decay=0.5, weight_decay_mode=mode, ns_dtype=torch.float32, backend="torch")
        for G in grads:
            W.grad = G.clone()
            opt.step()
        ref = _reference(W0, grads, lr=0.05, wd=0.5, mu=0.95, cautious=mode == "cautious")
        displacement = (ref - W0.double()).norm()
        assert ((W.detach().double() - ref).norm() / displacement).item() <= 1e-4
        results[mode] = W.detach().clone()
    # The two modes really differ (a large wd makes the masked-out decay visible)...
    assert (results["cautious"] - results["decoupled"]).abs().max() > 1e-2
    # ...and cautious decays less: every entry's |W| under cautious is at least what plain decay would leave.
    assert results["cautious"].norm() > results["decoupled"].norm()


def test_mask_is_exact_on_a_hand_example():
    """ns_steps=0: O is U/‖U‖; W = [[1, -1], [1, -1]], G = [[1, 1], [-1, -1]]: signs agree on the
    diagonal only, so only the diagonal decays."""
    W = nn.Parameter(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    W.grad = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    opt = mk.Muon([W], lr=0.1, momentum=0.0, nesterov=False, ns_steps=0, weight_decay=1.0,
                  weight_decay_mode="cautious", ns_dtype=torch.float32)
    opt.step()
    O = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) / 2.0
    decay = torch.tensor([[0.9, 1.0], [1.0, 0.9]])
    torch.testing.assert_close(W.detach(), torch.tensor([[1.0, -1.0], [1.0, -1.0]]) * decay - 0.1 * O, rtol=0, atol=1e-7)


def test_zero_entries_count_as_agreeing_and_signs_avoid_underflow():
    """𝟙[W·O ≥ 0] with W or O zero is 1; tiny W and O of opposite signs (their fp32 product underflows
    to -0.0 or 0) are still told apart by their signs."""
    W = [torch.tensor([0.0, 1e-30, -1e-30, 2.0, 3.0])]
    O = [torch.tensor([1.0, -1e-20, -1e-20, 0.0, -1.0])]
    torch_backend.decay_and_add(W, O, lr=0.5, weight_decay=1.0, scale=0.0, cautious=True)
    torch.testing.assert_close(W[0], torch.tensor([0.0, 1e-30, -0.5e-30, 1.0, 3.0]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_parameter_dtypes_and_tensor_lr(dtype):
    """16-bit parameters multiply by fp32 factors, fp64 ones by fp64 factors, and a tensor lr gives the
    float lr's result."""
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(16, 32, generator=g).to(dtype)
    grads = [torch.randn(16, 32, generator=g).to(dtype) for _ in range(3)]
    out = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64)):
        W = nn.Parameter(W0.clone())
        opt = mk.Muon([W], lr=lr, weight_decay=0.3, weight_decay_mode="cautious", ns_dtype=torch.float32)
        for G in grads:
            W.grad = G.clone()
            opt.step()
        out.append(W.detach())
    # The tensor-lr path multiplies O by -lr·scale before adding (two roundings, not one): an ulp apart.
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-14 if dtype == torch.float64 else 2**-7)
    ref = _reference(W0.double(), grads, lr=0.05, wd=0.3, mu=0.95, cautious=True)
    if dtype == torch.float64:  # fp32 Newton–Schulz: 1e-4 of the displacement (DESIGN.md §5)
        assert ((out[0] - ref).norm() / (ref - W0.double()).norm()).item() <= 1e-4
    else:  # bf16 storage: a few roundings of W (2^-8 relative each) per step
        assert ((out[0].double() - ref).norm() / ref.norm()).item() <= 3 * 2**-8


def test_option_is_validated_saved_and_planned():
    W = nn.Parameter(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"weight_decay_mode must be one of \('decoupled', 'cautious'\)"):
        mk.Muon([W], weight_decay_mode="sometimes")
    opt = mk.Muon([W], weight_decay_mode="cautious")
    assert "cautious weight decay" in opt.plan()[0].why
    W.grad = torch.randn_like(W)
    opt.param_groups[0]["weight_decay_mode"] = "always"
    before = W.detach().clone()
    with pytest.raises(ValueError, match="param group 0: weight_decay_mode"):
        opt.step()
    assert torch.equal(W, before) and not opt.state
    opt.param_groups[0]["weight_decay_mode"] = "cautious"
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["weight_decay_mode"] == "cautious"
    fresh = mk.Muon([nn.Parameter(W.detach().clone())], weight_decay_mode="cautious")
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["weight_decay_mode"] == "cautious"
    with pytest.raises(ValueError, match="saved with weight_decay_mode='cautious'"):  # never a silent switch
        mk.Muon([nn.Parameter(W.detach().clone())]).load_state_dict(sd)
    old = {**sd, "param_groups": [{k: v for k, v in g.items() if k != "weight_decay_mode"} for g in sd["param_groups"]]}
    legacy = mk.Muon([nn.Parameter(W.detach().clone())])
    legacy.load_state_dict(old)  # a checkpoint from before the key existed was decoupled
    assert legacy.param_groups[0]["weight_decay_mode"] == "decoupled"


def test_groups_with_different_modes_get_their_own_buckets():
    a, b = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8, 16))
    opt = mk.Muon([{"params": [a], "use_muon": True}, {"params": [b], "use_muon": True, "weight_decay_mode": "cautious"}],
                  weight_decay=0.5, lr=0.1)
    rows = opt.plan()
    assert "bucket of 1 matrix, iterated as" in rows[0].why and "bucket of 1 matrix," in rows[1].why
    assert "cautious" not in rows[0].why and "cautious weight decay" in rows[1].why
