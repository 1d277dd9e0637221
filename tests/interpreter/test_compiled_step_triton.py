"""torch.compile over a whole training step whose optimizer runs the Triton backend's custom ops
(CPU interpreter). A file of its own: its three cold compiles are Inductor's (C++ on a CPU, no
Triton), so only the newest Triton's pass of `make test` runs it (the Makefile's
OLD_TRITON_INTERPRETER_SKIP); every kernel inside is covered under each Triton by the other files.
"""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk


@pytest.mark.parametrize("options", [{}, {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0},
                                     {"momentum_dtype": "int8", "momentum_rounding": "stochastic"}])
def test_compiled_training_step_matches_eager(options):
    """Also with the variants' statistics op and the low-precision momentum kernel inside the graph."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 12))  # noqa: E731
    eager_model, compiled_model = make(), make()
    compiled_model.load_state_dict(eager_model.state_dict())
    kwargs = dict(lr=0.05, backend="triton", ns_dtype=torch.float32, ns_steps=2, **options)
    eager_opt, compiled_opt = mk.Muon(eager_model.parameters(), **kwargs), mk.Muon(compiled_model.parameters(), **kwargs)
    x = torch.randn(8, 12)

    def train_step(model, opt):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    compiled_step = torch.compile(train_step)
    for _ in range(2):
        train_step(eager_model, eager_opt)
        compiled_step(compiled_model, compiled_opt)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
