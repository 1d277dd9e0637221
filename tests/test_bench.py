"""`make bench` (bench/run.py) runs end to end here and writes the documented JSON and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import newton_schulz  # noqa: E402


def test_naive_flops_match_design_md():
    # DESIGN.md §3: 4m²n + 2m³ per step; §4: GPT-2 small's Muon matrices, 5 steps, ≈ 1.5 TFLOP.
    assert newton_schulz.naive_flops(2, 3, 1, steps=1) == 4 * 4 * 3 + 2 * 8
    per_layer = sum(newton_schulz.naive_flops(min(s), max(s), 1) for s in [(2304, 768), (768, 768), (3072, 768),
                                                                            (768, 3072)])
    assert 12 * per_layer / 1e12 == pytest.approx(1.5, abs=0.05)


def test_plain_recurrence_is_the_reference_recurrence():
    import torch

    from oracles import reference_ns

    g = torch.randn(3, 16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = reference_ns(g, [newton_schulz.COEFFICIENTS] * newton_schulz.STEPS)
    got = newton_schulz.plain_recurrence(g.float()).double()
    assert ((got - want).norm() / want.norm()).item() < 5e-2  # bf16 iteration


def test_benchmark_writes_results(tmp_path):
    run = subprocess.run(
        [sys.executable, "run.py", "--repeat", "1", "--warmup", "1", "--out-dir", str(tmp_path)],
        cwd=BENCH, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "speedup vs torch.optim.Muon" in run.stdout
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert {"device", "capability", "versions", "commit", "quick", "ns", "step", "update"} <= set(result)
    assert {"driver", "cuda", "torch", "triton"} <= set(result["versions"])
    assert result["quick"] is True
    ns_impls = {row["impl"] for row in result["ns"]}
    assert {"ours-torch", "torch.optim.Muon", "cublas-recurrence"} <= ns_impls
    for row in result["ns"]:
        m, n = row["shape"]
        assert len(row["samples"]) == 1 and row["ms"] > 0 and row["dtype"] == "bfloat16"
        assert row["tflops"] == pytest.approx(newton_schulz.naive_flops(m, n, row["batch"]) / row["ms"] / 1e9)
    assert {s["impl"] for s in result["ns_speedups"]} == {"ours-torch"}
    for row in result["update"]:
        assert {"impl", "gbps", "copy_gbps", "samples"} <= set(row) and row["gbps"] > 0 and row["copy_gbps"] > 0
    assert {row["impl"] for row in result["update"]} == {"ours-torch", "torch.optim.Muon"}
    impls = {row["impl"] for row in result["step"]}
    assert {"torch.optim.Muon", "ours-torch"} <= impls
    for row in result["step"]:
        assert row["model"] == "gpt2-small" and len(row["samples"]) == 1 and row["ms"] > 0
    pytest.importorskip("matplotlib")
    assert {p.name for p in tmp_path.glob("*.png")} == {path.stem + "-ns.png", path.stem + "-step.png"}


def _row(m, n, batch, impl, ms):
    return {"shape": [m, n], "batch": batch, "impl": impl, "ms": ms}


def test_crossover_is_the_smallest_m_from_which_triton_always_wins():
    import crossovers

    rows = []
    for m, triton_ms, torch_ms in [(256, 2.0, 1.0), (1024, 0.9, 1.0), (2048, 1.1, 1.0), (4096, 0.5, 1.0),
                                   (8192, 0.4, 1.0)]:
        rows += [_row(m, m, 1, "ours-triton", triton_ms), _row(m, m, 1, "ours-torch", torch_ms),
                 _row(m, m, 1, "torch.optim.Muon", 9.0)]
    assert crossovers.crossover(rows) == 4096  # 1024 wins but 2048 loses: not monotone there
    rows.append(_row(4096, 11008, 4, "ours-triton", 3.0))
    rows.append(_row(4096, 11008, 4, "ours-torch", 2.0))
    assert crossovers.crossover(rows) == 8192
    assert crossovers.crossover([_row(64, 64, 1, "ours-triton", 2.0), _row(64, 64, 1, "ours-torch", 1.0)]) is None


def test_crossover_table_reaches_the_dispatcher(tmp_path, monkeypatch):
    import crossovers

    from muon_kernels import backends

    gpu = {"device": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "commit": "abc", "ns": [
        _row(1024, 1024, 1, "ours-triton", 2.0), _row(1024, 1024, 1, "ours-torch", 1.0),
        _row(4096, 4096, 1, "ours-triton", 1.0), _row(4096, 4096, 1, "ours-torch", 2.0)]}
    cpu = {"device": "AMD EPYC", "capability": None, "commit": "abc", "ns": gpu["ns"]}
    (tmp_path / "nvidia-h100-2026-11-23-abc.json").write_text(json.dumps(gpu))
    (tmp_path / "amd-epyc-2026-11-23-abc.json").write_text(json.dumps(cpu))
    (tmp_path / "convergence-2026-11-23.json").write_text("{}")
    out = tmp_path / "crossovers.json"
    assert crossovers.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    table = json.loads(out.read_text())["by_capability"]
    assert list(table) == ["9.0"] and table["9.0"]["triton_min_m"] == 4096
    monkeypatch.setattr(backends, "CROSSOVERS_FILE", out)
    backends._crossover_table.cache_clear()
    try:
        assert backends.triton_min_m((9, 0))[0] == 4096
        assert "measured on NVIDIA H100" in backends.triton_min_m((9, 0))[1]
        assert backends.triton_min_m((8, 0)) == (backends.AUTO_TRITON_MIN_M,
                                                 "conservative default, no measurement committed for this GPU")
    finally:
        backends._crossover_table.cache_clear()
