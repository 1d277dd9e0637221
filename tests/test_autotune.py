"""Opt-in autotuning: a small space of sound configs, and a persisted choice (so resumed runs use
the same config and compute the same bits). The timing itself needs a GPU; the logic does not."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from muon_kernels.triton_kernels import autotune
from muon_kernels.triton_kernels.config import SHARED_MEMORY_LIMIT, _shared_bytes, all_configs, matmul_config, \
    tuning_space


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMIT))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tuning_space_is_small_sound_and_contains_the_table(arch, dtype):
    space = tuning_space(arch, dtype)
    assert 2 <= len(space) <= 6 and len(set(space)) == len(space)
    for cfg in space:
        assert _shared_bytes(cfg, dtype.itemsize) <= SHARED_MEMORY_LIMIT[arch]
        assert cfg in all_configs(arch).values()  # so the AOT test compiles it (no spills, tensor cores)
    assert matmul_config(torch.device("cuda"), dtype, 1024, 4096, 1024, arch=arch) in space
    assert all(c.block_m == c.block_n for c in tuning_space(arch, dtype, "symmetric"))


def test_choice_is_persisted_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "tune.json"))
    space = tuning_space(90, torch.bfloat16, "ns_update")
    times = {cfg: 1.0 + i for i, cfg in enumerate(space)}
    times[space[-1]] = 0.5
    ran = []

    def trial(cfg):
        ran.append(cfg)

    def bench(fn):
        fn()
        return times[ran[-1]]

    assert autotune.tuned("ns_update|sm90|bfloat16|1024|4096|1024", space, trial, bench) == space[-1]
    assert ran == space  # every candidate timed once, on the trial (scratch) path
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert list(saved) == ["ns_update|sm90|bfloat16|1024|4096|1024"]

    def must_not_run(fn):
        raise AssertionError("a persisted choice is not tuned again")

    assert autotune.tuned("ns_update|sm90|bfloat16|1024|4096|1024", space, trial, must_not_run) == space[-1]
    # The file is read once per key and process: launches ask on every call.
    monkeypatch.setattr(autotune, "_load", lambda: pytest.fail("the cache file is read again"))
    assert autotune.tuned("ns_update|sm90|bfloat16|1024|4096|1024", space, trial, must_not_run) == space[-1]


def test_a_choice_persisted_by_another_process_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "tune.json"))
    space = tuning_space(90, torch.bfloat16, "symmetric")
    key = "symmetric|sm90|bfloat16|1024|1024|4096"
    (tmp_path / "tune.json").write_text(json.dumps({key: {"config": list(dataclasses.astuple(space[1])), "ms": {}}}))

    def must_not_run(fn):
        raise AssertionError("a persisted choice is not tuned again")

    assert autotune.tuned(key, space, lambda cfg: None, must_not_run) == space[1]


def test_off_by_default_and_on_cpu(monkeypatch):
    monkeypatch.delenv(autotune.ENV, raising=False)
    assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV, "1")
    cfg = autotune.choose("symmetric", torch.device("cpu"), torch.float32, 64, 64, 64, lambda c: None)
    assert cfg == matmul_config(torch.device("cpu"), torch.float32, 64, 64, 64)
