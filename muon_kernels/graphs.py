"""``Muon(..., cuda_graph=True)``: the device work of a step captured once in a CUDA graph and replayed.

A steady-state step enqueues the same kernels on the same memory every time; replaying a captured
graph of them removes the host time of launching them one by one (on an H200 the GPT-2-small step
replayed in 6.7 ms against 8.5 ms eager: issue 26's measurement, not this project's bench).
Validation and planning still run on the host each step (no device work); what follows them —
momentum, Newton–Schulz, the updates, AdamW — is the graph.

A graph replays on the addresses and values it was captured with, so it is valid only while every
parameter, gradient and state tensor keeps its storage, the group settings keep their values and
the bucket plan stands. ``StepGraph`` keys the capture by all of them: the first step with a new
key runs eagerly (it is the warm-up: Triton compiles, state is created, the measured dispatch
decides), the next step with the same key is captured and replayed, and every later one is
replayed. A key that changes every step — gradients freed by ``zero_grad(set_to_none=True)``, a
float lr rewritten by a scheduler — runs eagerly, and after a few such steps one warning says what
changed and how to keep the graph.
"""

from __future__ import annotations

import threading
import warnings

import torch

# Eager steps in a row (each with a new key) before the warning.
WARN_AFTER = 3


# One capture at a time in the process, as torch.cuda.graph requires: entering one synchronizes the
# device and empties the allocator's cache, which invalidates another thread's capture under way
# (CUDA: synchronizing a device while a stream of it captures is invalid), so the captures of two
# optimizers stepped in two threads take turns. One capture stream per device, made under the lock.
_CAPTURE_LOCK = threading.Lock()
_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture(run) -> torch.cuda.CUDAGraph:
    """``run``'s kernels captured into a CUDA graph (not executed: replay executes them), on the
    current device (the optimizer makes it its parameters'). Errors of this thread only: a
    data-loader thread's CUDA calls during the capture do not break it. The capture stream is this
    device's own: ``torch.cuda.graph``'s default one is made once, on whichever device was current
    the first time."""
    device = torch.cuda.current_device()
    with _CAPTURE_LOCK:
        stream = _CAPTURE_STREAMS.get(device)
        if stream is None:
            stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
        graph = torch.cuda.CUDAGraph()
        # The outer stream context restores the caller's stream: torch.cuda.graph's exit ends the
        # capture first, and a failed capture raises there, before it switches back — the eager
        # fallback and all the thread's later work would run on the capture stream, which does not
        # synchronize with the legacy default stream as the caller's may.
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            run()
    return graph


class StepGraph:
    """Capture-and-replay of one optimizer's device work, keyed by (storages, settings, plan)."""

    def __init__(self, capture_fn=capture):
        self.capture = capture_fn
        self.graph = None
        self.key: tuple | None = None  # the captured graph's
        self.pending: tuple | None = None  # the last eager step's
        self.misses = 0
        self.warned = False
        self.failed = False  # a capture raised: every step runs eagerly from then on
        self.captures = 0
        self.checked: tuple | None = None  # the last key the optimizer found capturable

    def step(self, key_of, run) -> str:
        """Run the device work ``run`` for this step: "replay", "capture" (captured, then replayed)
        or "eager". ``key_of()``: this step's key; after an eager step it is asked again, so state the
        step created (the first step's momentum buffers) is in the key the next step must match."""
        key = key_of()
        if self.graph is not None and key == self.key:
            self.graph.replay()
            return "replay"
        # Any other key drops the graph: the eager step may replace device tables the graph reads
        # (a changed lr makes a new one and frees the old), so replaying it later could read freed memory.
        self.graph, self.key = None, None
        if key == self.pending and not self.failed:
            try:
                graph = self.capture(run)
            except Exception as exc:  # e.g. a host sync or host-to-device copy inside the step
                self.failed = True
                root = exc
                while root.__context__ is not None:  # a failed capture_end (or join) raises over the cause
                    root = root.__context__
                cause = f", raised while handling {root!r}" if root is not exc else ""
                warnings.warn(f"Muon(cuda_graph=True): capturing the step failed ({exc!r}{cause}); stepping eagerly "
                              "from now on", stacklevel=3)
            else:
                self.graph, self.key, self.misses = graph, key, 0
                self.captures += 1
                graph.replay()
                return "capture"
        run()
        self.misses += 1
        if self.misses >= WARN_AFTER and not self.warned and not self.failed:
            self.warned = True
            warnings.warn(f"Muon(cuda_graph=True): the step ran eagerly {self.misses} times in a row because "
                          f"{_what_changed(self.pending, key)} since the previous step, so no captured graph can "
                          "be replayed", stacklevel=3)
        self.pending = key_of()
        return "eager"


def check_capturable(param_groups: list[dict], placements, work) -> None:
    """ValueError where a step of these groups cannot be captured: distributed buckets (their
    collectives), a group with capturable=False, a device tensor among the settings a step reads on
    the host, or parameters on several devices. ``work``: (group index, group, parameters) per group."""
    if any(placement.kind != "local" for placement in placements):
        raise ValueError("cuda_graph=True does not capture the collectives of DDP/FSDP2 (distributed buckets): "
                         "pass cuda_graph=False (under DDP, distributed='off' also works where every rank "
                         "should step on its own)")
    for gi, group in enumerate(param_groups):
        if not group["capturable"]:
            raise ValueError(f"param group {gi} has capturable=False, but cuda_graph=True captures the step: "
                             "leave capturable at cuda_graph's default (True) for every group")
        read_on_host = ("momentum", "weight_decay") if group["use_muon"] else ("betas", "eps", "weight_decay")
        for key in read_on_host:
            values = group[key] if isinstance(group[key], (tuple, list)) else (group[key],)
            if any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values):
                raise ValueError(f"param group {gi}: {key} is a device tensor, which a step reads on the host "
                                 "(a sync that a CUDA graph cannot capture): give it as a float (lr alone may be "
                                 "a device tensor under cuda_graph=True)")
    devices = {p.device for _, _, params in work for p in params}
    if len(devices) > 1:
        raise ValueError(f"cuda_graph=True captures one device's work, but the parameters are on "
                         f"{sorted(map(str, devices))}: pass cuda_graph=False (or one optimizer per device)")


def state_storages(state, work) -> tuple:
    """The addresses of every state tensor of the stepped parameters: a graph replays on them, so
    state replaced by hand (optimizer.state cleared, a tensor assigned) needs a new capture."""
    get, none, tensor = state.get, {}, torch.Tensor
    return tuple([t.data_ptr() for _, _, params in work for p in params for t in get(p, none).values()
                  if isinstance(t, tensor)])


def _what_changed(before: tuple | None, after: tuple) -> str:
    if before is None or before[0] != after[0]:
        return ("a parameter or gradient moved to new memory (zero_grad(set_to_none=True) frees the gradients: use "
                "zero_grad(set_to_none=False))")
    if before[1] != after[1]:
        return ("a param group setting changed value (a scheduler writing a float lr: give lr, and adamw_lr, as "
                "device tensors and update them in place, lr.fill_(value))")
    if before[2] != after[2]:
        return ("the bucket plan was rebuilt (a parameter's dtype or shape, a plan setting, the optimizer's options, "
                "or load_state_dict changed)")
    return "optimizer state was replaced (optimizer.state cleared or a state tensor assigned)"
