"""Memory a Triton-backend ``Muon.step()`` holds, measured on a CPU, and ``LiveTensors``, the tracker
behind it (tests/test_memory.py and tests/test_replay.py use it too).

A tensor is tracked from the op (or ``workspace.empty``) that allocates its storage until CPython
frees that storage — on a CPU exactly when the last tensor or view of it goes. Storages that
existed before the block (parameters, gradients, optimizer state) are not counted. Inside a custom
op a dispatch mode sees nothing, so the buffers the kernel backends take from ``workspace.empty``
are reported by that function's observers instead; each storage counts once either way.

The step runs with bench/launch_overhead.py's stand-in driver and launchers: the Triton kernels are
real JITFunctions that launch nothing, so every buffer is allocated and let go exactly as on a GPU
(the values are not computed). Replay is off: the first step of a signature takes that path, and
on a GPU the caching allocator keeps what a step's peak reserved (a replayed call holds at most
what the plain call holds: tests/test_replay.py).

    python bench/step_memory.py [--model gpt2-small] [--layers 12] [--max-workspace-bytes N]

Prints the peak MiB of work buffers in one step beyond the parameters, gradients and state, and the
tensors alive at that peak.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from muon_kernels import workspace


class LiveTensors(TorchDispatchMode):
    """``peak_bytes``: the most bytes of tracked storages alive at once, and ``at_peak`` the (shape,
    dtype, bytes) of each then; ``peak_count[(shape, dtype)]``: the most tensors of that shape and
    dtype alive at once (by the tensor that allocated the storage). ``dispatch=False``: only the
    buffers ``workspace.empty`` hands out (all the Triton backend allocates), with no dispatch mode
    active — under one, the backends run their custom ops through the dispatcher, and a custom op may
    not return memory of its input, so a step would not consume its stacks."""

    def __init__(self, dispatch: bool = True):
        super().__init__()
        self.dispatch = dispatch
        self.live: dict[int, tuple[int, tuple]] = {}  # storage address -> (bytes, (shape, dtype))
        self.bytes = self.peak_bytes = 0
        self.at_peak: list[tuple] = []
        self.count: Counter = Counter()
        self.peak_count: Counter = Counter()

    def __enter__(self):
        workspace.observers.append(self.track)
        return super().__enter__() if self.dispatch else self

    def __exit__(self, *exc):
        workspace.observers.remove(self.track)
        return super().__exit__(*exc) if self.dispatch else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            given = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
            for t in _tensors(out):
                if t.untyped_storage().data_ptr() not in given:  # not in place, not out=
                    self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in self.live or storage.nbytes() == 0:
            return
        key = (tuple(t.shape), t.dtype)
        self.live[address] = (storage.nbytes(), key)
        self.bytes += storage.nbytes()
        self.count[key] += 1
        if self.bytes > self.peak_bytes:
            self.peak_bytes = self.bytes
            self.at_peak = [(*k, size) for size, k in self.live.values()]
        self.peak_count[key] = max(self.peak_count[key], self.count[key])
        weakref.finalize(storage, self._freed, address)  # torch keeps one Python object per storage

    def _freed(self, address: int) -> None:
        size, key = self.live.pop(address)
        self.bytes -= size
        self.count[key] -= 1


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def measure(model: str, layers: int, max_workspace_bytes: int | None) -> dict:
    import launch_overhead
    from muon_kernels.triton_kernels import replay

    with launch_overhead.stand_in() as calls, replay.replays(False):
        calls.recording = False
        opt = launch_overhead.make_optimizer(model, layers, 1)
        opt.max_workspace_bytes = max_workspace_bytes
        for _ in range(2):  # state, tables, plan
            opt.step()
        with LiveTensors(dispatch=False) as live:
            opt.step()
    return {"model": model, "layers": layers, "max_workspace_bytes": max_workspace_bytes,
            "buckets": [(b.matrices, b.m, b.n, str(b.dtype)) for b in opt._buckets],
            "peak_mib": live.peak_bytes / 2**20,
            "at_peak": [(list(shape), str(dtype), size / 2**20) for shape, dtype, size in live.at_peak]}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--max-workspace-bytes", type=int, default=2**30, help="0: no cap")
    args = parser.parse_args()
    r = measure(args.model, args.layers, args.max_workspace_bytes or None)
    print(f"{r['model']} ({r['layers']} layers), max_workspace_bytes={r['max_workspace_bytes']}: "
          f"{len(r['buckets'])} buckets {r['buckets']}")
    print(f"peak of one step's work buffers: {r['peak_mib']:.1f} MiB; alive then:")
    for shape, dtype, mib in r["at_peak"]:
        print(f"  {'×'.join(map(str, shape)):>16} {dtype:<15} {mib:8.1f} MiB")


if __name__ == "__main__":
    main()
