"""Stand-in backends for testing backend="auto"'s measuring mode on a CPU (tests/test_measured_dispatch.py,
the distributed scenario in distributed_workers.py): modules with the backend protocol that run the torch
backend's math (or, ``wrong=True``, a result outside the accuracy band), and a timer that reports
made-up times per backend instead of timing anything."""

from __future__ import annotations

import types

import torch

from muon_kernels.backends import measured, torch_backend


def fake_backend(name: str, wrong: bool = False) -> types.ModuleType:
    mod = types.ModuleType(f"fake_{name}")
    mod.NAME = name
    mod.paths = lambda m, n, ns_dtype, device, config=None: ("default",)
    mod.kernel_path = lambda m, n, ns_dtype, device, config=None, path=None: (path or "default", f"fake {name}")

    def orthogonalize(stack, config, ns_dtype, path=None, consume=False):
        out = torch_backend.orthogonalize(stack, config, ns_dtype)
        return out * 2 if wrong else out

    mod.orthogonalize = orthogonalize
    mod.momentum_stack = torch_backend.momentum_stack
    mod.apply_update = torch_backend.apply_update
    return mod


class FakeDispatch:
    """Patches ``measured`` so every "auto" bucket has the given backends as candidates and each
    backend "takes" ``ms[name]`` (a timer that records what it was asked to time)."""

    def __init__(self, monkeypatch, ms: dict[str, float], wrong: tuple[str, ...] = ()):
        self.backends = {name: fake_backend(name, name in wrong) for name in ms}
        self.ms, self.timed = ms, []
        monkeypatch.setattr(measured, "candidates", self.candidates)
        monkeypatch.setattr(measured, "time_candidate", self.time)

    def candidates(self, bucket):
        if bucket.request is None:
            return []
        return [measured.Candidate(b, "default", c) for c in measured.candidate_configs(bucket)
                for b in self.backends.values()]

    def time(self, option, run, device):
        assert isinstance(run(), torch.Tensor)
        self.timed.append(option.label)
        return self.ms[option.backend.NAME] * (0.5 if option.config.algorithm == "gram" else 1.0)
