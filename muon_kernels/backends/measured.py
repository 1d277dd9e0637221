"""``backend="auto"`` by measurement: time every path that computes the same math, keep the fastest.

Like ``torch.backends.cudnn.benchmark``: when a plan is built, each "auto" bucket whose device has
more than one way to orthogonalize it — torch's batched cuBLAS, the Triton symmetric kernels, the
Triton one-kernel path for small matrices, the CUDA extension, and standard vs Gram Newton–Schulz
when the group asked ``ns_algorithm="auto"`` — times each of them on scratch buffers of the
bucket's shape (random data, never the caller's tensors), drops any whose result leaves the
accuracy band of the torch backend's on the same input (DESIGN.md §5), and keeps the fastest.

The choice is keyed by (device name, compute capability, torch and Triton versions, the muon_kernels
code (cache_file.code_version), the fp32 matmul precision, dtypes, bucket shape and batch, the recurrence, the candidates) and written to a JSON
file beside the opt-in kernel autotuning cache (``MUON_KERNELS_DISPATCH_CACHE``, default
``~/.cache/muon_kernels/dispatch.json``, or under ``$XDG_CACHE_HOME``: cache_file.location; a file that
cannot be written costs a warning);
every later process reads it back, so a resumed run makes the same choice and computes the same
bits. Under ``Muon(cuda_graph=True)`` each candidate is timed as the step will run it: captured once
in a CUDA graph and replayed, without the host time of its launches (eager timing favours paths of
fewer launches, whose host time a replay removes anyway); a candidate that cannot be captured, or
whose replayed result leaves the band, is excluded, and the key records which timing it holds.
Nothing is timed while a CUDA graph is being captured or torch.compile traces (the cached choice,
else the static table, is used and nothing is written), and a measurement that fails falls back to
the table with a warning; under DDP/FSDP2 rank 0 of each process group measures and
every rank takes its choice (one broadcast per plan), so all ranks run the same kernels.

``dispatch="auto"`` (the default) measures except where no rank could share its choice: under
``distributed="off"`` with several ranks, each steps its plain parameters on its own, and ranks
that hold the same ones (replicas a user keeps in step by hand) would pick kernels of their own
from their own timings — near-ties fall either way — and drift apart bit by bit; there the table
stands. ``dispatch="measure"`` measures there too (ranks whose parameters differ: pipeline stages);
``dispatch="table"`` (``Muon``/``orthogonalize``), or ``MUON_KERNELS_DISPATCH=table``, keeps the
static dispatch table (backends/__init__.py, crossovers.json) everywhere.
"""

from __future__ import annotations

import os
import statistics
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from .. import cache_file, graphs
from ..bucket import Bucket
from ..ns_config import NSConfig
from ..recurrence import gram_outside_band
from ..workspace import on_device

MODES = ("auto", "measure", "table")
ENV = "MUON_KERNELS_DISPATCH"
CACHE_ENV = "MUON_KERNELS_DISPATCH_CACHE"
# Timed calls per candidate after two warm-up calls (the first compiles Triton kernels): the median.
REPEATS = 5


def mode(requested: str) -> str:
    """The dispatch mode: ``MUON_KERNELS_DISPATCH`` overrides the argument."""
    value = os.environ.get(ENV, "") or requested
    if value not in MODES:
        raise ValueError(f"dispatch must be one of {MODES}, got {value!r}" + (f" (from {ENV})" if os.environ.get(ENV)
                                                                               else ""))
    return value


def cache_path() -> Path | None:
    return cache_file.location(CACHE_ENV, "dispatch.json")


@dataclass(frozen=True)
class Candidate:
    """One way to orthogonalize a bucket: a backend, one of its kernel paths, a resolved recurrence."""

    backend: ModuleType
    path: str
    config: NSConfig

    @property
    def label(self) -> str:
        return f"{self.backend.NAME}:{self.path}" + (":gram" if self.config.algorithm == "gram" else "")


def candidates(bucket: Bucket) -> list[Candidate]:
    """Every path that computes this "auto" bucket's math on its device (none off CUDA: a CPU has
    one backend), for each of ``candidate_configs``."""
    if bucket.request is None or bucket.device.type != "cuda":
        return []
    from . import runnable

    return [Candidate(backend, path, config) for config in candidate_configs(bucket)
            for backend in runnable(bucket.device)
            for path in backend.paths(bucket.m, bucket.n, bucket.ns_dtype, bucket.device, config)]


def candidate_configs(bucket: Bucket) -> list[NSConfig]:
    """Gram and standard NS both only when the group asked ``ns_algorithm="auto"`` and Gram is not
    measured outside the band for its coefficients and dtype (``gram_outside_band``: the timing's
    band compares each path with its own algorithm, so it cannot see that)."""
    if bucket.request.algorithm != "auto":
        return [bucket.config]
    algorithms = ("standard",) if gram_outside_band(bucket.request, bucket.ns_dtype) else ("standard", "gram")
    return [replace(bucket.request, algorithm=a) for a in algorithms]


def _matmul_precision() -> str:
    """How cuBLAS runs fp32 matmuls (the torch candidates' speed depends on it), through whichever of
    torch's two APIs is in use: once ``torch.backends[.cuda.matmul].fp32_precision`` is set, reading
    the legacy ``get_float32_matmul_precision()``/``allow_tf32`` raises ("mix of the legacy and new APIs")."""
    try:
        return f"fp32 matmul {torch.get_float32_matmul_precision()}, tf32 {torch.backends.cuda.matmul.allow_tf32}"
    except RuntimeError:
        return (f"fp32_precision {getattr(torch.backends, 'fp32_precision', '-')}, "
                f"cuda matmul {getattr(torch.backends.cuda.matmul, 'fp32_precision', '-')}")


def _timing(replayed: bool) -> str:
    """How a record's candidates were timed: the last field of its key, and its ``timed``."""
    return "graph replays" if replayed else "eager calls"


def _key(bucket: Bucket, batch: int, labels: list[str], replayed: bool = False) -> str:
    device = bucket.device
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else device.type
    arch = "sm{}{}".format(*torch.cuda.get_device_capability(device)) if cuda else "-"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    request = bucket.request or bucket.config
    return "|".join([name, arch, f"torch {torch.__version__}", f"triton {triton_version}",
                     f"muon_kernels {cache_file.code_version()}", _matmul_precision(),
                     str(bucket.dtype).removeprefix("torch."), str(bucket.ns_dtype).removeprefix("torch."),
                     f"{batch}x{bucket.m}x{bucket.n}", repr(request), ",".join(labels), _timing(replayed)])


# What this process has read or measured, by key: a process reads the file once per key, not on
# every orthogonalize() call.
_MEMO: dict[str, dict] = {}


def _valid_record(record: object) -> bool:
    """What choose() and apply() read of a persisted record: a ``choice`` label and ``ms`` per label."""
    return (isinstance(record, dict) and isinstance(record.get("choice"), str) and isinstance(record.get("ms"), dict)
            and all(isinstance(ms, (int, float)) and not isinstance(ms, bool) for ms in record["ms"].values()))


def _load() -> dict:
    return cache_file.read(cache_path(), _valid_record)


def _store(key: str, record: dict) -> None:
    """Persist ``record``; a cache that cannot be written (read-only home, full disk) costs a
    warning, never the step."""
    try:
        cache_file.update(cache_path(), {key: record}, _valid_record)
    except Exception as exc:
        warnings.warn(f"muon_kernels: could not write the dispatch cache ({exc!r}); the choice holds for this "
                      f"process only (set {CACHE_ENV} to a writable file)", stacklevel=3)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def time_candidate(option: Candidate, run: Callable[[], torch.Tensor], device: torch.device) -> float:
    """Median milliseconds of ``run`` (``option``'s call, on ``device``'s current stream) over REPEATS
    calls after two warm-up calls, with CUDA events. ``option`` names what is timed (the CPU tests'
    stand-in timer answers by it)."""
    for _ in range(2):
        run()
    times = []
    for _ in range(REPEATS):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


# A record that excluded a candidate for running out of memory is not persisted: memory is what
# this process had free then, not a property of the path (the next process measures again).
_OUT_OF_MEMORY = "OutOfMemoryError"


def _replay_time(option: Candidate, run: Callable[[], torch.Tensor], device: torch.device,
                 check: Callable[[torch.Tensor], str | None]) -> tuple[float | None, str | None]:
    """(median ms, None) of ``run``'s replays from a CUDA graph captured after two eager calls (Triton
    compiles; work buffers and recorded launches are made outside the capture, as the optimizer's
    warm-up step makes them); or (None, why) where the replayed result fails ``check`` — a path
    that captures but computes otherwise on replay is not chosen for a replayed step. The graph and
    its memory pool are released before the caller captures the next candidate."""
    run()
    run()
    outs: list[torch.Tensor] = []
    graph = graphs.capture(lambda: outs.append(run()))
    try:
        graph.replay()  # the captured call's output is written by its replays, not by the capture
        why = check(outs[0])
        return (None, why) if why else (float(time_candidate(option, graph.replay, device)), None)
    finally:
        outs.clear()
        del graph


def measure(bucket: Bucket, batch: int, options: list[Candidate], replayed: bool = False) -> dict:
    """Time every candidate on a scratch stack of ``batch`` matrices of the bucket's shape, as eager
    calls or (``replayed``) as replays of a captured CUDA graph; returns the record that is
    persisted: ``choice`` (a label), ``ms`` per label, ``excluded`` (label: why), ``timed``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    stack = torch.randn((batch, bucket.m, bucket.n), generator=g).to(bucket.device, bucket.dtype)
    # The accuracy band (DESIGN.md §5), from the same input: the recurrence in fp64 is the reference;
    # a candidate may be off it by 2× the torch backend's own error in the iteration dtype + 1e-2
    # (16-bit) or + 1e-4 (fp32). Tied to torch's own error, the band follows the matmul precision
    # the user set (TF32 allowed or not), which the cache key records too. Checked on the batch's
    # first and last matrices (each is orthogonalized on its own; the last catches a path that goes
    # wrong past the first): an fp64 copy of the whole batch and its work buffers took ~5× the
    # memory of the step being measured.
    from . import torch_backend

    sample = [0, batch - 1] if batch > 1 else [0]
    references, bounds, ms, excluded = {}, {}, {}, {}
    for option in options:
        algorithm = option.config.algorithm
        if algorithm not in references:
            ref = torch_backend.orthogonalize(stack[sample].double(), option.config, torch.float64)
            own = torch_backend.orthogonalize(stack[sample], option.config, bucket.ns_dtype)
            references[algorithm] = ref
            bounds[algorithm] = 2 * _rel_err(own, ref) + (1e-4 if bucket.ns_dtype == torch.float32 else 1e-2)
        run = lambda o=option: o.backend.orthogonalize(stack, o.config, bucket.ns_dtype, path=o.path)  # noqa: E731

        def outside_band(out: torch.Tensor, algorithm=algorithm, how: str = "") -> str | None:
            err = _rel_err(out[sample], references[algorithm])
            return f"{how}error {err:.2e} > band {bounds[algorithm]:.2e}" if err > bounds[algorithm] else None

        try:
            why = outside_band(run())
            if why is None:
                with on_device(bucket.device):  # the events (and a capture) on the kernels' device
                    if replayed:
                        took, why = _replay_time(option, run, bucket.device,
                                                 lambda out: outside_band(out, how="replayed: "))
                    else:
                        took = float(time_candidate(option, run, bucket.device))
            if why is None:
                ms[option.label] = took
            else:
                excluded[option.label] = why
        except Exception as exc:  # a path that cannot run this shape here (or not in this memory)
            excluded[option.label] = f"{type(exc).__name__}: {exc}"[:200]
    return {"choice": min(ms, key=ms.get) if ms else None, "ms": ms, "excluded": excluded,
            "timed": _timing(replayed)}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(bucket: Bucket, batch: int, options: list[Candidate], measuring: bool,
           replayed: bool = False) -> dict | None:
    """The record for this bucket called on ``batch`` matrices at a time (timed as graph replays
    when ``replayed``): cached, else measured (and persisted) when ``measuring``; None when there is
    neither (the static table stands)."""
    key = _key(bucket, batch, [o.label for o in options], replayed)
    record = _MEMO.get(key) or _load().get(key)
    if record is None and measuring and not _capturing(bucket.device) and not torch.compiler.is_compiling():
        try:
            record = measure(bucket, batch, options, replayed)
        except Exception as exc:  # measuring is an optimization: the static table still works
            warnings.warn(f"muon_kernels: measuring the {bucket.m}x{bucket.n} bucket's paths failed ({exc!r}); "
                          "using the static dispatch table for it", stacklevel=2)
            return None
        if record["choice"] is not None and not any(why.startswith(_OUT_OF_MEMORY)
                                                     for why in record["excluded"].values()):
            _store(key, record)
    if record is not None:
        _MEMO[key] = record
    return record if record and record.get("choice") in {o.label for o in options} else None


def apply(bucket: Bucket, options: list[Candidate], record: dict) -> None:
    """Make ``bucket`` (and its FSDP2 shard bucket, which steps with the same backend) run the chosen candidate."""
    choice = next(o for o in options if o.label == record["choice"])
    times = ", ".join(f"{label} {ms:.3g} ms" for label, ms in sorted(record["ms"].items(), key=lambda kv: kv[1]))
    times = times or f"{choice.label}, rank 0's choice"
    elementwise = bucket.elementwise  # the fused kernels of an "auto" bucket (None: they follow the NS backend)
    bucket.backend, bucket.path, bucket.config = choice.backend, choice.path, choice.config
    bucket.elementwise = None if elementwise is choice.backend else elementwise
    how = f", {_timing(True)}" if record.get("timed") == _timing(True) else ""
    bucket.why = f"auto (measured{how}): {times}" + (f"; momentum and update on the {elementwise.NAME} fused kernels"
                                                     if bucket.elementwise is not None else "")
    if bucket.request is not None and bucket.request.algorithm == "auto":
        bucket.algorithm = f"auto (measured): {'Gram' if choice.config.algorithm == 'gram' else 'standard'} NS"
    bucket.cache.clear()


def resolve_one(bucket: Bucket, batch: int, dispatch: str, replayed: bool = False) -> None:
    """Apply the measured choice to one "auto" bucket called on ``batch`` matrices (this process
    alone; timed as graph replays when ``replayed``)."""
    if mode(dispatch) == "table":
        return
    options = candidates(bucket)
    if len(options) > 1:
        record = choose(bucket, batch, options, measuring=True, replayed=replayed)
        if record is not None:
            apply(bucket, options, record)


def resolve(buckets: list[Bucket], placements, dispatch: str, max_workspace_bytes: int | None = None,
            collectives: bool = True, ranks_alone: int = 1, replayed: bool = False) -> None:
    """Apply measured choices to every "auto" bucket with more than one candidate, timed on the
    batch one call of the step takes (the first chunk under ``max_workspace_bytes`` of the bucket,
    or under DDP/FSDP2 of a rank's share).
    ``placements`` (muon_kernels/distributed.py): buckets computed over a process group take the
    choice of its rank 0, broadcast (``collectives``; plan() alone passes False and shows each
    rank's own). ``ranks_alone``: how many ranks step their local buckets on their own
    (``distributed="off"``); above one, "auto" keeps the table for them (the module docstring).
    ``replayed``: the step is replayed from a CUDA graph (``cuda_graph=True``), and so are the timings."""
    chosen = mode(dispatch)
    if chosen == "table":
        return
    import torch.distributed as dist

    from ..rank_agreement import control_device

    shared: dict[object, list[int]] = {}
    for i, b in enumerate(buckets):
        group = placements[i].group if collectives else None
        if group is None and chosen == "auto" and ranks_alone > 1 and placements[i].kind == "local":
            if len(candidates(b)) > 1:
                b.why += (f"; table, not measured: distributed='off' on {ranks_alone} ranks, each timing alone could "
                          "choose other kernels for parameters they hold alike (dispatch='measure' to measure anyway)")
        elif group is None:
            resolve_one(b, _batch(b, max_workspace_bytes), dispatch, replayed)
        else:  # every bucket: the ranks' lists agree (the plan is verified alike), whatever their candidates
            shared.setdefault(group, []).append(i)
    for group, idx in shared.items():
        options = {i: candidates(buckets[i]) for i in idx}
        lead = dist.get_rank(group) == 0
        records = {i: choose(buckets[i], _batch(buckets[i], max_workspace_bytes, placements[i].owners), options[i],
                             measuring=lead, replayed=replayed) if len(options[i]) > 1 else None for i in idx}
        if not any(_capturing(buckets[i].device) for i in idx):  # never a collective inside a capture
            # Rank 0's choice by label (a code of it), not by position: ranks on other GPU models or
            # software can list other candidates; one without rank 0's keeps its table.
            picks = torch.tensor([_label_code(records[i] and records[i]["choice"]) for i in idx], dtype=torch.int64)
            picks = picks.to(control_device(group, buckets[idx[0]].device))
            dist.broadcast(picks, src=dist.get_global_rank(group, 0), group=group)
            for i, code in zip(idx, picks.tolist()):
                pick = next((o.label for o in options[i] if _label_code(o.label) == code), None)
                if pick is None:
                    records[i] = None
                elif records[i] is None or records[i]["choice"] != pick:  # rank 0's (its times are rank 0's)
                    records[i] = {"choice": pick, "ms": {}, "excluded": {}}
        for i in idx:
            if records[i] is not None:
                apply(buckets[i], options[i], records[i])
                shard = placements[i].shard
                if shard is not None:  # a rank's rows step with the bucket's elementwise backend
                    shard.backend, shard.elementwise = buckets[i].backend, buckets[i].elementwise
                    shard.cache.clear()


def _batch(bucket: Bucket, max_workspace_bytes: int | None, owners: list[int] | None = None) -> int:
    """Matrices per orthogonalize call of the step: the first chunk of the bucket, or under DDP/FSDP2
    of the largest share a rank orthogonalizes (``owners``: each entry's rank)."""
    total = None
    if owners:
        total = max(sum(e.view.batch for e, o in zip(bucket.entries, owners) if o == r) for r in set(owners))
    start, stop = bucket.chunks(max_workspace_bytes, total)[0]
    return stop - start


def _label_code(label: str | None) -> int:
    """A candidate's label as an int64 for the broadcast (its CRC-32), -1 for none."""
    return zlib.crc32(label.encode()) if label else -1
