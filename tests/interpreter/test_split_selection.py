"""The launch-shape rules as plain Python (no kernel runs): split factors, slices, persistent grids,
SM counts, shape classes and the tuned-config table. Collected with the interpreter suite."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from muon_kernels.triton_kernels import config as kcfg
from muon_kernels.triton_kernels.config import (INTERPRETER_CONFIG, INTERPRETER_SMS, MAX_SPLIT, MIN_SPLIT_ITERATIONS,
                                                MatmulConfig, split_cost, split_factor)
from muon_kernels.triton_kernels.symmetric_matmul import launch_shape

H200_SMS = 132
LARGE = MatmulConfig(128, 128, 64, 8, 4, tma=True)


def _tiles(m: int, block: int = 128, batch: int = 1) -> int:
    side = -(-m // block)
    return side * (side + 1) // 2 * batch


@pytest.mark.parametrize("m, k, expected", [
    (1024, 4096, 3),   # X·Xᵀ of 1024×4096: 36 tiles on 132 SMs, 64 K steps → 108 programs in one wave
    (768, 3072, 4),    # 21 tiles, 48 steps → 84 programs
    (2048, 8192, 3),   # 136 tiles: just over one wave, so three slices
    (1024, 1024, 1),   # b·A + c·A·A at 1024: 16 steps do not pay for the reduction
    (4096, 4096, 1),   # 528 tiles: four waves, no split
    (8192, 8192, 1),
])
def test_split_factor_on_an_h200(m, k, expected):
    assert split_factor(_tiles(m), -(-k // 64), H200_SMS) == expected


def test_split_factor_rules():
    for tiles in range(1, 3 * H200_SMS, 7):
        for iterations in (1, 3, 8, 17, 64, 128, 1024):
            s = split_factor(tiles, iterations, H200_SMS)
            assert 1 <= s <= MAX_SPLIT
            assert s == 1 or iterations // s >= MIN_SPLIT_ITERATIONS  # every slice fills its pipeline
            assert s == 1 or tiles < kcfg.SPLIT_TILE_WAVES * H200_SMS
            assert split_cost(tiles, iterations, H200_SMS, s) <= split_cost(tiles, iterations, H200_SMS, 1)
    assert split_factor(0, 64, H200_SMS) == 1


@pytest.mark.parametrize("batch, m, k", [(1, 1, 9), (2, 40, 33), (1, 70, 2048), (3, 100, 64), (1, 1024, 4096),
                                         (5, 768, 3072), (1, 4096, 1), (1, 4, 0), (1, 40, 150), (1, 70, 320)])
# 4 and 6 slices of 5 and 10 K steps round up to 2-step slices: 3 and 5 of them, none empty
@pytest.mark.parametrize("split_k", [0, 1, 2, 3, 4, 6, 7, 16])
@pytest.mark.parametrize("persistent", [False, True])
def test_launch_shape_slices_cover_k_without_empty_slices(batch, m, k, split_k, persistent):
    for cfg, sms in ((replace(LARGE, split_k=split_k, persistent=persistent), H200_SMS),
                     (replace(INTERPRETER_CONFIG, split_k=split_k, persistent=persistent), INTERPRETER_SMS)):
        tiles, splits, k_per_split, programs = launch_shape(batch, m, k, cfg, sms)
        assert tiles == _tiles(m, cfg.block_m, batch)
        assert k_per_split % cfg.block_k == 0 and splits >= 1
        assert (splits - 1) * k_per_split < k <= splits * k_per_split or (k <= k_per_split and splits == 1)
        if split_k:
            assert splits <= split_k
        items = tiles * splits
        assert programs == (min(items, sms) if persistent else items)


def test_sm_count_comes_from_the_device_once(monkeypatch):
    assert kcfg.sm_count(torch.device("cpu")) == INTERPRETER_SMS
    asked = []

    class Props:
        multi_processor_count = 132

    def props(index):
        asked.append(index)
        return Props()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(kcfg, "is_interpreting", lambda: False)
    kcfg._device_sms.cache_clear()
    try:
        assert kcfg.sm_count(torch.device("cuda", 3)) == 132
        assert kcfg.sm_count(torch.device("cuda", 3)) == 132
        assert asked == [3]  # cached per device
    finally:
        kcfg._device_sms.cache_clear()


def test_only_hopper_tuning_offers_tma_and_no_table_uses_it_unmeasured():
    cuda = torch.device("cuda")
    assert not kcfg.matmul_config(cuda, torch.bfloat16, 1024, 4096, 1024, arch=90).tma
    assert any(c.tma for c in kcfg.tuning_candidates(90, torch.bfloat16))
    for arch in (80, 86, 89):
        assert not any(c.tma for c in kcfg.all_configs(arch).values())
    for arch in kcfg.ARCHS:
        for dtype in (torch.bfloat16, torch.float32):
            for cfg in kcfg.tuning_candidates(arch, dtype):
                assert kcfg._shared_bytes(cfg, dtype.itemsize) <= kcfg.SHARED_MEMORY_LIMIT[arch]
                assert cfg in kcfg.all_configs(arch).values()  # so the AOT test compiles it
            assert all(c.block_m == c.block_n for c in kcfg.tuning_candidates(arch, dtype, "symmetric"))


def test_shape_classes():
    assert [kcfg.shape_class(m, n) for m, n in ((64, 4096), (128, 128), (1024, 4096), (2048, 2048))] == \
        ["small", "mid", "mid", "large"]


def test_tuned_winners_file_and_forced_configs(tmp_path, monkeypatch):
    cuda = torch.device("cuda")
    winner = MatmulConfig(128, 128, 64, 8, 5, tma=True, split_k=1)
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"winners": [{"arch": 90, "dtype": "bfloat16", "kind": "symmetric",
                                             "shape_class": "mid", "config": asdict(winner)}]}))
    assert kcfg.load_tuned(path) == {(90, "bfloat16", "symmetric", "mid"): winner}
    monkeypatch.setattr(kcfg, "_TUNED_NOW", kcfg.load_tuned(path))
    assert kcfg.matmul_config(cuda, torch.bfloat16, 1024, 1024, 4096, arch=90, kind="symmetric") == winner
    table = kcfg.matmul_config(cuda, torch.bfloat16, 1024, 1024, 4096, arch=90)
    assert kcfg.matmul_config(cuda, torch.bfloat16, 1024, 1024, 4096, arch=90, kind="ns_update") == table
    assert kcfg.matmul_config(cuda, torch.bfloat16, 4096, 4096, 4096, arch=90, kind="symmetric") == table
    with kcfg.forced(ns_update=INTERPRETER_CONFIG):
        assert kcfg.matmul_config(cuda, torch.bfloat16, 8, 8, 8, kind="ns_update") == INTERPRETER_CONFIG
    assert kcfg.matmul_config(cuda, torch.bfloat16, 8, 8, 8, arch=90, kind="ns_update") != INTERPRETER_CONFIG
    with pytest.raises(ValueError):
        with kcfg.forced(gram=INTERPRETER_CONFIG):
            pass


def test_forced_configs_nest_and_restore_the_outer_ones():
    """bench/tune.py forces one kind inside a block that forces another: leaving the inner block
    gives back the outer block's configs, and leaving that one the table's."""
    cuda, other = torch.device("cuda"), replace(INTERPRETER_CONFIG, block_k=16)

    def chosen(kind):
        return kcfg.matmul_config(cuda, torch.bfloat16, 8, 8, 8, arch=90, kind=kind)

    table = chosen("ns_update")
    assert table not in (INTERPRETER_CONFIG, other) and not kcfg.forcing()
    with kcfg.forced(symmetric=INTERPRETER_CONFIG, ns_update=INTERPRETER_CONFIG):
        with kcfg.forced(ns_update=other):
            assert (chosen("symmetric"), chosen("ns_update")) == (INTERPRETER_CONFIG, other)
        assert (chosen("symmetric"), chosen("ns_update")) == (INTERPRETER_CONFIG, INTERPRETER_CONFIG)
        assert kcfg.forcing()
    assert chosen("ns_update") == table and not kcfg.forcing()


def test_config_labels_are_distinct():
    for arch in kcfg.ARCHS:
        labels = [c.label() for c in kcfg.all_configs(arch).values()]
        assert len(labels) == len(set(labels))
