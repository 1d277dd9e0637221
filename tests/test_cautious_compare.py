"""The flip-aware comparison of cautious weight decay (tests/cautious_compare.py) that the GPU and
interpreter tests use: it passes a backend against itself, allows a mask flip only as the decay
of that entry, and fails a wrong mask."""

from __future__ import annotations

import pytest
import torch

import cautious_compare

SHAPES = [(12, 20), (20, 12)]


def test_a_backend_against_itself_has_no_flips():
    result = cautious_compare.run_pair("torch", SHAPES, torch.float32, "cpu")
    assert cautious_compare.check(result, tol=0.0) == 0


def _synthetic(flip_at=None, flagged=None, decay=0.025):
    q = torch.randn(40, 50, generator=torch.Generator().manual_seed(3))
    p = q.clone()
    flipped = torch.zeros_like(q, dtype=torch.bool)
    if flip_at is not None:
        p[flip_at] = q[flip_at] / (1 - decay)  # one backend decayed this entry, the other did not
    if flagged is not None:
        flipped[flagged] = True
    return {"kernel": [p], "torch": [q], "flipped": [flipped], "steps": 1, "lr": 0.05, "wd": 0.5}


def test_a_flipped_entry_may_differ_by_its_decay():
    assert cautious_compare.check(_synthetic(flip_at=(3, 4), flagged=(3, 4)), tol=1e-5) == 1


def test_a_difference_where_the_masks_agree_fails():
    with pytest.raises(AssertionError):
        cautious_compare.check(_synthetic(flip_at=(3, 4)), tol=1e-5)


def test_more_than_the_decay_at_a_flipped_entry_fails():
    with pytest.raises(AssertionError):
        cautious_compare.check(_synthetic(flip_at=(3, 4), flagged=(3, 4), decay=0.2), tol=1e-5)


def test_many_flips_fail():
    """A kernel with the sign convention reversed flips about half of the masks."""
    with pytest.raises(AssertionError):
        cautious_compare.check(_synthetic(flagged=(slice(None), slice(0, 25))), tol=1e-5)


def test_the_mask_matches_the_cautious_rule():
    w = torch.tensor([1.0, -1.0, 1.0, 0.0, -2.0])
    o = torch.tensor([2.0, -3.0, -1.0, -1.0, 0.0])
    assert cautious_compare.mask(w, o).tolist() == [True, True, False, True, True]
