"""FSDP2 shards through the Triton backend's fused kernels (CPU interpreter, gloo, 2 processes):
each rank's rows of every matrix take the fused momentum and update kernels, as a single process
does (the torch path is trapped), and training equals one process on the concatenated batch."""

from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

import distributed_workers as workers

FP32_TOLERANCE = 1e-4  # of each parameter's displacement, as in tests/test_distributed.py


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_shards_take_the_fused_kernels(tmp_path):
    world = 2
    mp.spawn(workers.run_scenario, args=(world, _port(), "train_fsdp_fused", torch.float32, str(tmp_path)),
             nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    assert all(res["momentum_is_sharded"] for res in results)
    assert all(" (sharded)" in res["plan"] and "triton" in res["plan"] for res in results)
    ref = workers.reference(world, torch.float32)
    start = {n: p.detach() for n, p in workers.make_model().named_parameters()}
    for r, res in enumerate(results):
        for name in ref:
            err = ((res["params"][name] - ref[name]).norm() / (ref[name] - start[name]).norm()).item()
            assert err <= FP32_TOLERANCE, f"rank {r} {name}: {err:.2e} of its displacement"
            assert torch.equal(res["params"][name], results[0]["params"][name]), name
