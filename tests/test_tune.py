"""bench/tune.py's harness on a CPU: the smoke run under the interpreter writes one valid JSON with
the documented schema, and a spent budget skips items but still leaves a valid JSON. (The timings
of a smoke run mean nothing; the GPU run is `make tune`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
ROW_KEYS = {"item", "shape", "batch", "dtype", "config", "label", "flops"}


def _run(tmp_path: Path, *extra: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "tune.py", "--smoke", "--out", str(tmp_path), *extra], cwd=BENCH, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = list(tmp_path.glob("tune-smoke-*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    return json.loads(files[0].read_text()), run.stdout


def test_smoke_run_writes_the_schema_and_winners_config_reads(tmp_path):
    """One smoke run (~40 s on 2 cores) serves both checks: as two tests, pytest-xdist would run it
    once per worker."""
    doc, stdout = _run(tmp_path)
    assert doc["schema"] == 1 and doc["smoke"] is True and doc["complete"] is True and doc["skipped"] == []
    assert {"device", "capability", "arch", "sms", "versions", "budget_minutes", "elapsed_s", "ceilings", "results",
            "winners", "notes", "shapes"} <= set(doc)
    ns = [r for r in doc["results"] if r["item"] == "ns"]
    products = [r for r in doc["results"] if r["item"] == "product"]
    assert {r["impl"] for r in ns} >= {"ours", "ours-replayed", "ours-gram", "ours-gram-restart2", "ours-cublas",
                                       "ours-symmetric-cublas", "cublas-recurrence"}
    assert all(r["host_us"] > 0 for r in ns if "error" not in r)
    # Whether the replayed row was recorded: never under the interpreter (replay is off there), so
    # its time is the plain path's, and the row says so.
    assert [r["recorded"] for r in ns if r["impl"] == "ours-replayed"] == [False] * len(
        [r for r in ns if r["impl"] == "ours-replayed"]) != []
    assert {r["product"] for r in products} == {"gram", "poly", "update"}
    cublas = [r for r in doc["results"] if r["item"] == "product-cublas"]
    assert {(tuple(r["shape"]), r["batch"], r["product"]) for r in cublas} == \
        {(tuple(r["shape"]), r["batch"], r["product"]) for r in products}
    for r in doc["results"]:
        assert ROW_KEYS <= set(r) and "error" not in r, r
        assert r["ok"] and r["repeatable"] and r["ms"] > 0 and r["rel_err"] <= (r.get("bound") or 2e-2)
    split_rows = [r for r in products if r["kind"] == "symmetric"]
    assert {r["config"]["split_k"] for r in split_rows} == {0, 1, 2}
    assert all({"tiles", "splits", "iterations", "predicted"} <= set(r) for r in split_rows)
    assert any(r["table"] for r in products)
    assert "ms" in stdout.splitlines()[0] and "wrote" in stdout

    # The winners are in the form config.py reads.
    from muon_kernels.triton_kernels import config as kcfg

    fake = dict(doc, arch=90)
    # Make one non-table config clearly faster than the table at every point of its class.
    for r in fake["results"]:
        if r["item"] == "product" and r["kind"] == "ns_update" and not r["table"]:
            r["ms"] = 1e-6
    sys.path.insert(0, str(BENCH))
    try:
        import tune
    finally:
        sys.path.remove(str(BENCH))
    winners = tune.winners(fake)
    assert winners and all(w["speedup"] > 1 for w in winners)
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"winners": winners}))
    table = kcfg.load_tuned(path)
    assert all(key[0] == 90 and key[2] in kcfg.KINDS for key in table)


def test_spent_budget_keeps_the_json_valid(tmp_path):
    doc, stdout = _run(tmp_path, "--budget-minutes", "0")
    assert doc["complete"] is False and doc["skipped"] and doc["results"] == []
    assert "budget reached" in stdout


@pytest.mark.parametrize("content", [None, "{}", "not json"])
def test_a_tuned_configs_file_that_cannot_be_read_is_refused_naming_the_variable(tmp_path, content):
    """MUON_KERNELS_TUNED_CONFIGS is set on purpose (a tuning session's winners): a missing or
    malformed file stops the import with the variable's name, never falls back silently."""
    path = tmp_path / "winners.json"
    if content is not None:
        path.write_text(content)
    run = subprocess.run([sys.executable, "-c", "import muon_kernels.triton_kernels.config"], capture_output=True,
                         text=True, env=dict(os.environ, MUON_KERNELS_TUNED_CONFIGS=str(path)), timeout=300)
    assert run.returncode != 0 and f"MUON_KERNELS_TUNED_CONFIGS={path}: not a readable bench/tune.py JSON" in run.stderr


def test_gpu_timings_wait_for_the_l2_flush(monkeypatch):
    """On a GPU every eager timing flushes the L2 and waits for it before its start event
    (common.time_call's ``before``): triton's do_bench queued the start event behind the flush, so a
    host-bound call read as its host time minus the flush's. The run is sized from one flushed timing."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import tune
    finally:
        sys.path.remove(str(BENCH))
    flush, calls = object(), []

    def fake_time_call(fn, *, device, warmup, repeat, before=None):
        calls.append((warmup, repeat, before))
        return [0.5] * repeat

    monkeypatch.setattr(tune, "flush_l2", lambda device: flush)
    monkeypatch.setattr(tune, "time_call", fake_time_call)
    timer = tune.Timer(torch.device("cuda"), smoke=False)
    assert timer.eager(lambda: None) == 0.5
    assert calls == [(2, 1, flush), (0, int(tune.TIMED_MS / 0.5), flush)]
