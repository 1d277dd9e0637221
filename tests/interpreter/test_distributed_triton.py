"""FSDP2 shards through the Triton backend's fused kernels (CPU interpreter, gloo, 2 processes):
each rank's rows of every matrix take the fused momentum and update kernels, as a single process
does (the torch path is trapped), and training equals one process on the concatenated batch."""

from __future__ import annotations

import torch

import distributed_workers as workers

FP32_TOLERANCE = 1e-4  # of each parameter's displacement, as in tests/test_distributed.py


def test_fsdp2_shards_take_the_fused_kernels(tmp_path):
    world = 2
    results = workers.spawn(tmp_path, "train_fsdp_fused", world)
    assert all(res["momentum_is_sharded"] for res in results)
    assert all(" (sharded)" in res["plan"] and "triton" in res["plan"] for res in results)
    ref = workers.reference(world, torch.float32)
    start = {n: p.detach() for n, p in workers.make_model().named_parameters()}
    for r, res in enumerate(results):
        for name in ref:
            err = ((res["params"][name] - ref[name]).norm() / (ref[name] - start[name]).norm()).item()
            assert err <= FP32_TOLERANCE, f"rank {r} {name}: {err:.2e} of its displacement"
            assert torch.equal(res["params"][name], results[0]["params"][name]), name
