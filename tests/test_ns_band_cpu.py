"""The CPU side of tests/gpu/test_ns_algorithms_gpu.py::test_16bit_band: the torch backend, same
input and same bound (DESIGN.md §5, the plain 16-bit baseline with the preset's own normalization,
tests/oracles.py, band). On this input the results land at 0.14–0.27 of the bound in bf16 and 0.06–0.13
in fp16, so the GPU backends have room for their own accumulation orders."""

from __future__ import annotations

import functools

import pytest
import torch

import muon_kernels as mk
from oracles import band, plain_recurrence, rel_err

CASES = [("gram", "keller"), ("gram", "polar_express"), ("standard", "turbo"), ("gram", "turbo")]


@functools.lru_cache(maxsize=None)
def _input() -> torch.Tensor:
    return torch.randn(4, 256, 1024, generator=torch.Generator().manual_seed(8), dtype=torch.float64).float()


@functools.lru_cache(maxsize=None)
def _band(dtype: torch.dtype, preset: str):
    return band(_input(), dtype, preset)


@pytest.mark.parametrize("algorithm, preset", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_band_on_the_cpu(algorithm, preset, dtype):
    G = _input()
    ref, bound = _band(dtype, preset)
    out = mk.orthogonalize(G, ns_coefficients=preset, ns_dtype=dtype, ns_algorithm=algorithm, backend="torch")
    assert out.dtype == G.dtype  # the input's dtype, whatever the iteration dtype
    assert rel_err(out, ref) <= bound


def test_turbo_baseline_measures_rounding_not_the_normalization():
    """The Frobenius-only baseline misses AOL: its error is the normalization gap, several times the
    rounding error of the AOL baseline (here 4.0e-2 against 2.8e-3 in fp16)."""
    ref, bound = _band(torch.float16, "turbo")
    frobenius_only = rel_err(plain_recurrence(_input(), torch.float16, "turbo", None), ref)
    assert (bound - 1e-2) / 2 < frobenius_only / 5
