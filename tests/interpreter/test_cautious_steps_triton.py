"""Whole cautious-weight-decay steps, Triton (CPU interpreter) against the torch backend, with the
flip-aware comparison the GPU test uses (tests/cautious_compare.py): the two backends' O differ by
rounding, so a mask may flip where an O entry is within rounding of zero; elsewhere they agree.
test_cautious_triton.py checks the fused update on one shared O, where no flip can happen."""

from __future__ import annotations

import pytest
import torch

import cautious_compare

SHAPES = [(12, 20), (20, 12), (12, 20)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cautious_steps_match_the_torch_backend(dtype):
    result = cautious_compare.run_pair("triton", SHAPES, dtype, "cpu")
    cautious_compare.check(result, tol=1e-5 if dtype == torch.float32 else 2.0**-7)
