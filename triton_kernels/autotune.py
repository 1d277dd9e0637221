"""Opt-in autotuning of the matmul kernels' launch configs (``MUON_KERNELS_AUTOTUNE=1``).

Off, the default: configs come from config.py's fixed table, so results never depend on a race.
On: the first call of a kernel for a (kernel, arch, dtype, m, n, k) times every config of a small
per-arch space and keeps the fastest. Trials run on scratch outputs, never on the caller's
buffers, so no in-place kernel needs ``restore_value``. The choice is written to a JSON file
(``MUON_KERNELS_AUTOTUNE_CACHE``, default ``~/.cache/muon_kernels/autotune.json``) and read back by
every later process, so a run resumed in a new process uses the same configs — the same
accumulation order, the same bits. Delete the file to tune again (say, after a driver update).

The space is small on purpose: every config in it is AOT-compiled for every arch by the tests
(tensor cores used, shared memory within the arch's limit, no spills), so tuning can only choose
among kernels already known to be sound. 16-bit: the table's 128×128×64 (8 warps) and 64×64×64
(4 warps) tiles, 128×128×32 (half the shared memory per stage, for sm_86/89's 99 KB), and the
two 128×64 / 64×128 rectangles for ``a·X + B·X`` on wide X. fp32 (FFMA): 64×64×16 and its two
halves. The symmetric kernel takes square tiles only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from ..environment import Switch
from .config import MatmulConfig, arch_of, is_interpreting, matmul_config, tuning_space

ENV = "MUON_KERNELS_AUTOTUNE"
CACHE_ENV = "MUON_KERNELS_AUTOTUNE_CACHE"
KINDS = ("symmetric", "ns_update")
_ENABLED = Switch(ENV)  # read per product launch: a test may switch tuning on between calls

_LOCK = threading.Lock()
# (cache file, key) -> the config chosen in this process: a launch asks on every call, and reading
# and parsing the JSON file each time cost more than the launch.
_CHOSEN: dict[tuple[str, str], MatmulConfig] = {}


def enabled() -> bool:
    return _ENABLED.get() == "1"


def cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "muon_kernels" / "autotune.json")


def _key(kind: str, arch: int, dtype: torch.dtype, m: int, n: int, k: int) -> str:
    return f"{kind}|sm{arch}|{str(dtype).removeprefix('torch.')}|{m}|{n}|{k}"


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, cfg: MatmulConfig, timings: dict[str, float]) -> None:
    with _LOCK:
        data = _load()
        data[key] = {"config": list(dataclasses.astuple(cfg)), "ms": timings}
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one


def choose(kind: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int,
           trial: Callable[[MatmulConfig], object]) -> MatmulConfig:
    """The config for this call: the fixed table's when tuning is off (or on the interpreter, or
    while a CUDA graph is being captured and nothing is cached yet); else the cached or newly tuned
    one. ``trial(cfg)`` runs the kernel once with ``cfg`` on scratch outputs."""
    heuristic = matmul_config(device, dtype, m, n, k, kind=kind)
    if not enabled() or is_interpreting() or device.type != "cuda":
        return heuristic
    arch = arch_of(device.index if device.index is not None else torch.cuda.current_device())
    key = _key(kind, arch, dtype, m, n, k)
    if torch.cuda.is_current_stream_capturing() and (str(cache_path()), key) not in _CHOSEN and key not in _load():
        return heuristic  # timing inside a capture is impossible; tune in an eager warm-up step
    from triton.testing import do_bench

    return tuned(key, tuning_space(arch, dtype, kind), trial, do_bench)


def tuned(key: str, space: list[MatmulConfig], trial: Callable[[MatmulConfig], object],
          bench: Callable[[Callable[[], object]], float]) -> MatmulConfig:
    """The persisted choice for ``key``, or the fastest of ``space`` by ``bench`` (then persisted);
    the file is read once per key and process, not per launch."""
    memo = (str(cache_path()), key)
    chosen = _CHOSEN.get(memo)
    if chosen is not None:
        return chosen
    saved = _load().get(key)
    if saved is not None:
        chosen = _CHOSEN[memo] = MatmulConfig(*saved["config"])
        return chosen
    timings = {repr(cfg): float(bench(lambda cfg=cfg: trial(cfg))) for cfg in space}
    best = _CHOSEN[memo] = min(space, key=lambda cfg: timings[repr(cfg)])
    _store(key, best, timings)
    return best
