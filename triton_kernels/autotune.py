"""Opt-in autotuning of the matmul kernels' launch configs (``MUON_KERNELS_AUTOTUNE=1``).

Off, the default: configs come from config.py's fixed table, so results never depend on a race.
On: the first call of a kernel for a (GPU, Triton version and muon_kernels code, kernel, dtype, m,
n, k) times every config of a small per-arch space and keeps the fastest. Trials run on scratch
outputs, never on the caller's buffers, so no in-place kernel needs ``restore_value``. The choice is written to a JSON file
(``MUON_KERNELS_AUTOTUNE_CACHE``, default ``~/.cache/muon_kernels/autotune.json``, or under ``$XDG_CACHE_HOME``: cache_file.location) and read back by
every later process, so a run resumed in a new process uses the same configs — the same
accumulation order, the same bits (a cached config outside the current space is tuned again; a
file that cannot be written costs a warning, and the choice holds for the process). Delete the
file to tune again (say, after a driver update).

The space is small on purpose: every config in it is AOT-compiled for every arch by the tests
(tensor cores used, shared memory within the arch's limit, no spills), so tuning can only choose
among kernels already known to be sound. 16-bit: the table's 128×128×64 (8 warps) and 64×64×64
(4 warps) tiles, 128×128×32 (half the shared memory per stage, for sm_86/89's 99 KB), and the
two 128×64 / 64×128 rectangles for ``a·X + B·X`` on wide X. fp32 (FFMA): 64×64×16 and its two
halves. The symmetric kernel takes square tiles only.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Callable

import torch

from .. import cache_file
from ..environment import Switch
from .config import MatmulConfig, arch_of, is_interpreting, matmul_config, tuning_space

ENV = "MUON_KERNELS_AUTOTUNE"
CACHE_ENV = "MUON_KERNELS_AUTOTUNE_CACHE"
KINDS = ("symmetric", "ns_update")
_ENABLED = Switch(ENV)  # read per product launch: a test may switch tuning on between calls

# (cache file, key) -> the config chosen in this process: a launch asks on every call, and reading
# and parsing the JSON file each time cost more than the launch.
_CHOSEN: dict[tuple[str, str], MatmulConfig] = {}


def enabled() -> bool:
    return _ENABLED.get() == "1"


def cache_path() -> Path | None:
    return cache_file.location(CACHE_ENV, "autotune.json")


@functools.cache
def _device_key(device_index: int) -> str:
    """What a tuned config depends on besides the call: the GPU (GPUs that take one table arch
    differ in SMs, clocks and shared memory), and the Triton version and muon_kernels code that
    compile the kernels (a config may spill under one Triton version only: config.py's
    _EXTRA_16_WARPS; an edited kernel may prefer another config)."""
    import triton

    return (f"{torch.cuda.get_device_name(device_index)}|sm{arch_of(device_index)}|triton {triton.__version__}"
            f"|muon_kernels {cache_file.code_version()}")


def _key(kind: str, device_index: int, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    return f"{_device_key(device_index)}|{kind}|{str(dtype).removeprefix('torch.')}|{m}|{n}|{k}"


def _valid_record(record: object) -> bool:
    return isinstance(record, dict) and isinstance(record.get("config"), list)


def _load() -> dict:
    return cache_file.read(cache_path(), _valid_record)


def _saved(key: str, space: list[MatmulConfig]) -> MatmulConfig | None:
    """The persisted config for ``key`` if it is one of ``space``: tuning only ever runs configs
    known to be sound (module docstring), and one with other fields was written by another version."""
    record = _load().get(key)
    if record is None:
        return None
    try:
        cfg = MatmulConfig(*record["config"])
    except TypeError:
        return None
    return cfg if cfg in space else None


def _store(key: str, cfg: MatmulConfig, timings: dict[str, float]) -> None:
    """Persist the choice; a cache that cannot be written (read-only home, full disk) costs a
    warning, never the launch that tuned it."""
    try:
        cache_file.update(cache_path(), {key: {"config": list(dataclasses.astuple(cfg)), "ms": timings}},
                          _valid_record)
    except Exception as exc:
        warnings.warn(f"muon_kernels: could not write the autotuning cache ({exc!r}); the choice holds for this "
                      f"process only (set {CACHE_ENV} to a writable file)", stacklevel=4)


def choose(kind: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int,
           trial: Callable[[MatmulConfig], object]) -> MatmulConfig:
    """The config for this call: the fixed table's when tuning is off (or on the interpreter, or
    while a CUDA graph is being captured and nothing is cached yet); else the cached or newly tuned
    one. ``trial(cfg)`` runs the kernel once with ``cfg`` on scratch outputs."""
    heuristic = matmul_config(device, dtype, m, n, k, kind=kind)
    if not enabled() or is_interpreting() or device.type != "cuda":
        return heuristic
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = _key(kind, index, dtype, m, n, k)
    space = tuning_space(arch_of(index), dtype, kind)
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing and (str(cache_path()), key) not in _CHOSEN and _saved(key, space) is None:
        return heuristic  # timing inside a capture is impossible; tune in an eager warm-up step
    from triton.testing import do_bench

    return tuned(key, space, trial, do_bench)


def tuned(key: str, space: list[MatmulConfig], trial: Callable[[MatmulConfig], object],
          bench: Callable[[Callable[[], object]], float]) -> MatmulConfig:
    """The persisted choice for ``key``, or the fastest of ``space`` by ``bench`` (then persisted);
    the file is read once per key and process, not per launch."""
    memo = (str(cache_path()), key)
    chosen = _CHOSEN.get(memo)
    if chosen is not None:
        return chosen
    saved = _saved(key, space)
    if saved is not None:
        _CHOSEN[memo] = saved
        return saved
    timings = {repr(cfg): float(bench(lambda cfg=cfg: trial(cfg))) for cfg in space}
    best = _CHOSEN[memo] = min(space, key=lambda cfg: timings[repr(cfg)])
    _store(key, best, timings)
    return best
