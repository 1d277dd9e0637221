"""Opt-in autotuning: a small space of sound configs, and a persisted choice (so resumed runs use
the same config and compute the same bits). The timing itself needs a GPU; the logic does not."""

from __future__ import annotations

import dataclasses
import json
import warnings

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


def _fastest_last(space):
    """A trial and a bench under which the last config of ``space`` is the fastest."""
    ran = []

    def bench(fn):
        fn()
        return 0.5 if ran[-1] == space[-1] else 1.0

    return ran.append, bench


@pytest.mark.parametrize("content, warned", [
    ("[]", 1), ('{"KEY": "128x128x64"}', 1), ('{"KEY": {"ms": {}}}', 1),
    # Well-formed, but written by another version (a field this one lacks) or outside the space:
    # tuned again without a warning.
    ('{"KEY": {"config": [128, 128, 64, 8, 3, 8, 0, false, false, 1], "ms": {}}}', 0),
    ('{"KEY": {"config": [16, 16, 16, 1, 9], "ms": {}}}', 0),
], ids=["a list", "a string", "no config", "another version", "outside the space"])
def test_a_malformed_or_foreign_cached_config_is_tuned_again(tmp_path, monkeypatch, content, warned):
    path = tmp_path / "tune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    key = "symmetric|sm90|bfloat16|1024|1024|4096"
    path.write_text(content.replace("KEY", key))
    space = tuning_space(90, torch.bfloat16, "symmetric")
    trial, bench = _fastest_last(space)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert autotune.tuned(key, space, trial, bench) == space[-1]
    assert len([w for w in caught if f"cache file {path}" in str(w.message)]) == warned
    assert json.loads(path.read_text())[key]["config"] == list(dataclasses.astuple(space[-1]))


def test_an_unwritable_cache_warns_and_the_choice_holds_in_memory(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(autotune.CACHE_ENV, str(blocked / "tune.json"))  # a path under a file
    space = tuning_space(90, torch.bfloat16, "ns_update")
    trial, bench = _fastest_last(space)
    key = "ns_update|sm90|bfloat16|1024|4096|1024"
    with pytest.warns(UserWarning, match="could not write the autotuning cache"):
        assert autotune.tuned(key, space, trial, bench) == space[-1]

    def must_not_run(fn):
        raise AssertionError("the choice is not tuned again")

    assert autotune.tuned(key, space, trial, must_not_run) == space[-1]


def test_the_key_names_the_gpu_and_the_triton_and_package_versions(monkeypatch):
    """Two GPUs that take one table arch, or one GPU under another Triton or muon_kernels version,
    tune apart: a config may spill under one Triton version only (config.py)."""
    import triton

    import muon_kernels

    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H800"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: names[index])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    autotune._device_key.cache_clear()
    try:
        keys = [autotune._key("symmetric", index, torch.bfloat16, 1024, 1024, 4096) for index in names]
        assert keys[0] != keys[1]
        assert all(part in keys[0] for part in (names[0], "sm90", f"triton {triton.__version__}",
                                                f"muon_kernels {muon_kernels.__version__}", "symmetric|bfloat16|1024"))
    finally:
        autotune._device_key.cache_clear()  # the real device's key is made again
