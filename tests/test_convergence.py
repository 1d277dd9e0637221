"""A 20-step smoke run of the convergence experiments writes the documented curves and report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


# The digits task reads scikit-learn's bundled copy (the `experiments` extra, which `make test`
# installs); an offline machine without it (the GPU machine) still runs the other task.
TASKS = ["digits", "chars"] if importlib.util.find_spec("sklearn") else ["chars"]


def test_convergence_smoke_run(tmp_path):
    committed = BENCH.parent / "docs" / "convergence.md"
    before = committed.read_bytes()
    run = subprocess.run(  # no --docs-dir: a smoke (or quick) run's report goes beside its JSON
        [sys.executable, "convergence.py", "--smoke-steps", "20", "--tasks", *TASKS,
         "--out-dir", str(tmp_path / "results")],
        cwd=BENCH, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert committed.read_bytes() == before  # the committed full-mode report is left alone
    [path] = (tmp_path / "results").glob("convergence-*.json")
    assert path.name.endswith("-smoke.json")
    docs = tmp_path / "results" / path.stem
    result = json.loads(path.read_text())
    assert result["mode"] == "smoke" and [t["key"] for t in result["tasks"]] == TASKS
    for task in result["tasks"]:
        sweep = [r for r in task["runs"] if r["experiment"] == "sweep" and r["view"] == "equal-samples"]
        configs = {(r["lr_schedule"], r["batch_schedule"], r["nesterov"]) for r in sweep}
        assert len(configs) == 16  # 4 lr schedules × 2 batch schedules × Nesterov on/off
        for r in task["runs"]:
            assert 0 < r["steps"] <= 20 and r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == r["steps"]
            samples = [p["samples"] for p in r["curve"]]
            assert samples == sorted(samples) and samples[0] == 0
            for p in r["curve"]:
                assert p["grad_norm"] > 0 and p["loss"] > 0
        for r in sweep:  # an equal-samples run never spends more than the budget
            assert r["curve"][-1]["samples"] <= task["budget_samples"]
        growing = [r for r in sweep if r["batch_schedule"] == "growing"]
        constant = [r for r in sweep if r["batch_schedule"] == "constant"]
        assert growing and constant
    assert {row["method"] for row in result["quadratic"]["rows"]} == {"muon", "gd", "sgd-momentum"}
    doc = (docs / "convergence.md").read_text()
    for claim in ("larger constant batch", "growing batch", "Diminishing lr", "Nesterov", "low-rank"):
        assert claim in doc
    # the figures are optional (pip install .[experiments]); the document says which way it went
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed, so no figures were drawn" in doc
    else:
        assert (docs / "convergence-quadratic.png").stat().st_size > 0
