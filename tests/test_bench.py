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
