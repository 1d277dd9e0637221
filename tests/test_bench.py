"""`make bench`'s step benchmark runs end to end here and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_step_benchmark_writes_results(tmp_path):
    run = subprocess.run(
        [sys.executable, "step.py", "--repeat", "1", "--warmup", "1", "--out-dir", str(tmp_path)],
        cwd=BENCH, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "speedup vs torch.optim.Muon" in run.stdout
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert {"device", "capability", "versions", "commit", "quick", "ns", "step", "update"} <= set(result)
    assert {"driver", "cuda", "torch", "triton"} <= set(result["versions"])
    impls = {row["impl"] for row in result["step"]}
    assert {"torch.optim.Muon", "ours-torch"} <= impls
    for row in result["step"]:
        assert row["model"] == "gpt2-small" and len(row["samples"]) == 1 and row["ms"] > 0
