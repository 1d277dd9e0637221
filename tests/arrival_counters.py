"""The GPU check both split-K symmetric kernels (Triton's and the CUDA extension's) share: a split
product reduces in its own launch at per-stream arrival counters (``muon_kernels.workspace.COUNTERS``)
that every launch leaves at zero, and takes fresh zeros under CUDA graph capture."""

from __future__ import annotations

import torch

from muon_kernels import workspace


def check_streams_and_graph(product, inputs: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    """``product(x)`` captured once in a CUDA graph and replayed, and run 20 times on each of two side
    streams at once (``inputs[i]`` on stream i), gives ``eager[i]``'s bits every time; the capture
    keeps no counters of its own, and every kept counter is back at zero."""
    kept = {key: id(c) for key, c in workspace.COUNTERS.by_stream.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = product(inputs[0])
    assert {key: id(c) for key, c in workspace.COUNTERS.by_stream.items()} == kept  # fresh counters, none kept
    for _ in range(3):
        static.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, eager[0])

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = [[], []]
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(product(inputs[i]))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(o, eager[i]) for o in outs[i]), f"stream {i}"
    assert len(workspace.COUNTERS.by_stream) >= 3  # the default stream and the two side streams
    assert not any(c.any() for c in workspace.COUNTERS.by_stream.values())
