"""`make bench` (bench/run.py) runs end to end here and writes the documented JSON and plots."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import newton_schulz  # noqa: E402
import ns_algorithms  # noqa: E402


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
        [sys.executable, "run.py", "--repeat", "1", "--warmup", "1", "--out-dir", str(tmp_path),
         "--models", "gpt2-small", "--width-divisor", "8"],
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
    assert {"ours-torch", "ours-torch-gram", "ours-torch-aol", "torch.optim.Muon", "cublas-recurrence"} <= ns_impls
    # The peer row wherever the peer is installed (make test installs it, except on an offline host).
    assert ("gram-newton-schulz" in ns_impls) == (importlib.util.find_spec("gram_newton_schulz") is not None)
    for row in result["ns"]:
        m, n = row["shape"]
        assert len(row["samples"]) == 1 and row["ms"] > 0 and row["dtype"] == "bfloat16"
        assert row["tflops"] == pytest.approx(newton_schulz.naive_flops(m, n, row["batch"]) / row["ms"] / 1e9)
    assert {s["impl"] for s in result["ns_speedups"]} == {"ours-torch", "ours-torch-gram", "ours-torch-aol"}
    algorithms = {(tuple(r["shape"]), r["dtype"], r["algorithm"]): r for r in result["ns_algorithms"]}
    # an explicit --width-divisor shrinks the algorithms section's points too (a smoke run)
    assert {(m, n, dt) for (m, n), dt, _ in algorithms} == set(ns_algorithms.points(torch.device("cpu"), 8))
    assert {a for _, _, a in algorithms} == {"standard", "gram", "turbo", "standard-4"}
    for (shape, dtype, algorithm), r in algorithms.items():
        assert r["ms"] > 0 and r["speedup"] == pytest.approx(algorithms[(shape, dtype, "standard")]["ms"] / r["ms"])
        if algorithm == "gram":  # the same map: only rounding apart from the fp64 recurrence
            assert r["recurrence_error"] <= (1e-4 if dtype == "float32" else 5e-2)
    assert "Newton–Schulz algorithms" in run.stdout
    for row in result["update"]:
        assert {"impl", "gbps", "copy_gbps", "samples"} <= set(row) and row["gbps"] > 0 and row["copy_gbps"] > 0
    assert {row["impl"] for row in result["update"]} == {"ours-torch", "torch.optim.Muon"}
    impls = {row["impl"] for row in result["step"]}
    assert {"torch.optim.Muon", "ours-torch", "ours-torch-cautious", "ours-torch-normuon-hyperball",
            "ours-torch-gram"} <= impls
    for row in result["step"]:  # each CPU row interleaved with its own reference twin: 1 sample each
        assert row["model"] == "gpt2-small" and row["width_divisor"] == 8 and row["ms"] > 0
        assert len(row["samples"]) == (len(impls) - 1 if row["impl"] == "torch.optim.Muon" else 1)
    for s in result["step_speedups"]:
        row = next(r for r in result["step"] if r["impl"] == s["impl"])
        assert s["speedup"] == pytest.approx(row["paired_reference_ms"] / row["ms"])
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


def test_the_newest_result_per_capability_is_picked_by_date(tmp_path):
    """An H100 and an H200 share capability 9.0; "nvidia-h100-…" sorts after "h200-…" as a string,
    so the newest run is found by the date in the name."""
    import crossovers

    old = {"device": "NVIDIA H100 80GB HBM3", "capability": [9, 0], "commit": "old", "ns": [
        _row(1024, 1024, 1, "ours-triton", 1.0), _row(1024, 1024, 1, "ours-torch", 2.0)]}
    new = {"device": "NVIDIA H200", "capability": [9, 0], "commit": "new", "ns": [
        _row(1024, 1024, 1, "ours-triton", 2.0), _row(1024, 1024, 1, "ours-torch", 1.0),
        _row(4096, 4096, 1, "ours-triton", 1.0), _row(4096, 4096, 1, "ours-torch", 2.0)]}
    (tmp_path / "nvidia-h100-2026-11-23-old.json").write_text(json.dumps(old))
    (tmp_path / "h200-2026-12-04-new.json").write_text(json.dumps(new))
    table = crossovers.table(tmp_path)
    assert table["9.0"]["commit"] == "new" and table["9.0"]["triton_min_m"] == 4096


def test_committed_crossovers_are_generated_from_the_committed_results():
    import crossovers

    committed = json.loads(crossovers.OUT.read_text())
    assert committed["by_capability"] == crossovers.table(crossovers.RESULTS_DIR)
    assert committed["by_device"] == crossovers.device_table(crossovers.RESULTS_DIR)
    for entry in [*committed["by_capability"].values(), *committed["by_device"].values()]:
        assert (crossovers.REPO / entry["source"]).is_file()


def test_a_gpu_takes_its_own_models_crossover_before_its_capabilitys(tmp_path, monkeypatch):
    """An H100 and an H200 share 9.0 but not their bandwidth: each takes its own result; a third 9.0
    GPU (an H800) takes the newest 9.0 result."""
    import crossovers

    from muon_kernels import backends

    def result(device, wins_from):
        return {"device": device, "capability": [9, 0], "commit": device[-4:], "ns": [
            row for m in (1024, 2048, 4096) for row in (_row(m, m, 1, "ours-triton", 1.0 if m >= wins_from else 3.0),
                                                        _row(m, m, 1, "ours-torch", 2.0))]}

    (tmp_path / "nvidia-h100-2026-11-23-a.json").write_text(json.dumps(result("NVIDIA H100 80GB HBM3", 1024)))
    (tmp_path / "h200-2026-12-04-b.json").write_text(json.dumps(result("NVIDIA H200", 4096)))
    out = tmp_path / "crossovers.json"
    assert crossovers.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    monkeypatch.setattr(backends, "CROSSOVERS_FILE", out)
    backends._crossover_table.cache_clear()
    try:
        assert backends.triton_min_m((9, 0), "NVIDIA H100 80GB HBM3")[0] == 1024
        assert backends.triton_min_m((9, 0), "NVIDIA H200")[0] == 4096
        min_m, source = backends.triton_min_m((9, 0), "NVIDIA H800")
        assert min_m == 4096 and "measured on NVIDIA H200" in source
        assert backends.triton_min_m((8, 0), "NVIDIA A100-SXM4-80GB")[0] == backends.AUTO_TRITON_MIN_M
    finally:
        backends._crossover_table.cache_clear()


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


# ---------------------------------------------------------------- budgeted runs and make gpu-check
def test_work_plan_puts_the_gpu_targets_first():
    import torch

    import run

    plan = run.work_plan(torch.device("cuda"), run.SECTIONS, run.GPU_MODELS, quick=True)
    # every target of bench/targets.json before any row no target reads
    assert plan[:12] == [("step", ("gpt2-small", 1, "default")), ("ns", (4096, 4096, 1)), ("ns", (1024, 4096, 1)),
                         ("ns", (768, 768, 48)), ("ns", (8192, 8192, 1)), ("ns", (2048, 8192, 1)),
                         ("step", ("llama-1b", 1, "default")), ("step", ("gpt2-medium", 1, "default")),
                         ("update", "gpt2-small"), ("step", ("gpt2-small", 1, "rest")),
                         ("step", ("llama-1b", 1, "rest")), ("step", ("gpt2-medium", 1, "rest"))]
    import gpu_check

    targets = gpu_check.load_targets()
    first = plan[:9]
    for t in targets:
        if t["kind"] == "step_speedup":
            assert ("step", (t["model"], 1, "default")) in first
        elif t["kind"] == "step_ratio":  # variant rows: the first of the "rest" groups
            assert plan[9] == ("step", (t["model"], 1, "rest"))
        elif t["kind"] == "ns_speedup":
            assert ("ns", (*t["shape"], t["batch"])) in first
        elif t["kind"] == "update_fraction":
            assert ("update", t["model"]) in first
    assert len(plan) == len(set(plan))  # nothing twice
    steps = [what for section, what in plan if section == "step"]
    assert {m for m, _, _ in steps} == set(run.GPU_MODELS)
    assert {(m, g) for m, _, g in steps} == {(m, g) for m in run.GPU_MODELS for g in ("default", "rest")}
    # LLaMA-1B's default rows come before any variant row (a budgeted H200 run was cut inside them).
    assert steps.index(("llama-1b", 1, "default")) < min(i for i, (_, _, g) in enumerate(steps) if g == "rest")


def test_step_groups_split_the_rows_in_two():
    import torch

    import step

    device = torch.device("cpu")
    every = [name for name, _ in step.implementations(device, quick=True, width_divisor=8)]
    default = [name for name, _ in step.implementations(device, quick=True, width_divisor=8, group="default")]
    rest = [name for name, _ in step.implementations(device, quick=True, width_divisor=8, group="rest")]
    assert sorted(default + rest) == sorted(every) and not set(default) & set(rest)
    assert default == [n for n in step.DEFAULT_IMPLS if n in every] and default[0] == "torch.optim.Muon"
    assert all("cautious" not in n and "int8" not in n for n in default)
    with pytest.raises(ValueError):
        step.implementations(device, quick=True, group="variants")
    with pytest.raises(ValueError):  # the CPU pairs every row with its reference twin: no split there
        step.run(device, models=["gpt2-small"], width_divisor=8, quick=True, warmup=0, repeat=1,
                 progress=lambda text: None, group="default")


def test_cpu_step_plan_covers_every_width_of_both_shape_sets():
    import torch

    import run

    plan = run.work_plan(torch.device("cpu"), ["step"], run.PRIORITY_MODELS, quick=True, widths=(8, 4, 1))
    assert plan == [("step", (m, w)) for m in ("gpt2-small", "llama-1b") for w in (8, 4, 1)]


def test_step_ratios_come_from_the_interleaved_twin():
    import step

    rows = [{"model": "gpt2-small", "width_divisor": 4, "impl": "torch.optim.Muon", "ms": 10.0},
            {"model": "gpt2-small", "width_divisor": 4, "impl": "ours-torch", "ms": 4.0, "paired_reference_ms": 12.0},
            {"model": "gpt2-small", "width_divisor": 1, "impl": "torch.optim.Muon", "ms": 100.0},
            {"model": "gpt2-small", "width_divisor": 1, "impl": "ours-torch", "ms": 50.0}]
    assert step.speedups(rows) == [{"model": "gpt2-small", "width_divisor": 4, "impl": "ours-torch", "speedup": 3.0},
                                   {"model": "gpt2-small", "width_divisor": 1, "impl": "ours-torch", "speedup": 2.0}]
    # a bf16-parameter row against the reference on bf16 parameters, never the fp32 one
    rows += [{"model": "gpt2-small", "width_divisor": 1, "impl": "torch.optim.Muon-bf16-params", "ms": 80.0},
             {"model": "gpt2-small", "width_divisor": 1, "impl": "ours-auto-bf16-params", "ms": 20.0},
             {"model": "llama-1b", "width_divisor": 1, "impl": "torch.optim.Muon", "ms": 10.0},
             {"model": "llama-1b", "width_divisor": 1, "impl": "ours-auto-bf16-params", "ms": 5.0}]
    assert step.speedups(rows)[2:] == [
        {"model": "gpt2-small", "width_divisor": 1, "impl": "ours-auto-bf16-params", "speedup": 4.0}]


def test_bf16_parameter_rows_step_bf16_parameters():
    import torch

    import step

    assert (step.param_dtype("ours-auto-bf16-params"), step.param_dtype("ours-auto")) == ("bf16", "fp32")
    mats, vecs = step.make_params("gpt2-small", 1, 16, torch.device("cpu"), dtype=torch.bfloat16)
    fp32, _ = step.make_params("gpt2-small", 1, 16, torch.device("cpu"))
    for p in mats + vecs:
        assert p.dtype == p.grad.dtype == torch.bfloat16
    assert all(torch.equal(p, q.to(torch.bfloat16)) for p, q in zip(mats, fp32))  # the same draws, rounded
    # a GPU run's default group ends with the pair, reference first, for the GPT-2 models only
    assert step.DEFAULT_IMPLS[-2:] == ("torch.optim.Muon-bf16-params", "ours-auto-bf16-params")
    cuda = torch.device("cuda")  # names only: building the table touches no device
    for model in ("gpt2-small", "gpt2-medium", "llama-1b"):
        default = [name for name, _ in step.implementations(cuda, quick=False, group="default", model=model)]
        rest = [name for name, _ in step.implementations(cuda, quick=False, group="rest", model=model)]
        bf16 = [name for name in default + rest if step.param_dtype(name) == "bf16"]
        assert bf16 == (list(step.DEFAULT_IMPLS[-2:]) if model in step.BF16_PARAM_MODELS else []), model


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_stops_cleanly_with_a_valid_json(tmp_path, monkeypatch):
    import run

    clock = FakeClock()
    done = []

    def fake_ns(device, *, todo, **kw):
        done.append(("ns", todo[0]))
        clock.now += 60.0
        m, n, b = todo[0]
        return [{"shape": [m, n], "batch": b, "impl": impl, "ms": ms, "samples": [ms], "tflops": 1.0 / ms,
                 "mm_peak_tflops": 2.0, "fraction_of_peak": 0.5 / ms}
                for impl, ms in (("ours-torch", 1.0), ("cublas-recurrence", 2.0))], []

    def fake_step(device, *, models, on_row, **kw):
        done.append(("step", models[0]))
        clock.now += 60.0
        rows = [{"model": models[0], "impl": impl, "ms": ms, "width_divisor": 8, "layers": 12, "layers_run": 12,
                 "extra_memory_bytes": None, "samples": [ms]} for impl, ms in (("torch.optim.Muon", 3.0),
                                                                               ("ours-torch", 1.0))]
        for row in rows:  # as the real one: each row handed over as it is done
            on_row(row)
        return rows

    monkeypatch.setattr(run.newton_schulz, "run", fake_ns)
    monkeypatch.setattr(run.step, "run", fake_step)
    monkeypatch.setattr(run.update, "run", lambda *a, **k: pytest.fail("update is not in this run's sections"))
    monkeypatch.setitem(sys.modules, "plots", type(sys)("plots"))  # no drawing of fake numbers
    sys.modules["plots"].draw = lambda result, stem: []
    argv = ["--sections", "ns", "step", "--out-dir", str(tmp_path), "--budget-minutes", "2.5", "--models", "gpt2-small",
            "--width-divisor", "8"]
    assert run.main(argv, clock=clock) == 0
    assert len(done) == 3  # started at 0, 60 and 120 s; none at 180 s
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["complete"] is False and result["budget_minutes"] == 2.5
    assert result["skipped"] and all(item[0] in ("ns", "step") for item in result["skipped"])
    assert [r["impl"] for r in result["step"]] == ["torch.optim.Muon", "ours-torch"]
    assert result["step_speedups"] == [{"model": "gpt2-small", "width_divisor": 8, "impl": "ours-torch",
                                        "speedup": 3.0}]


@pytest.mark.parametrize("slowdown", [0.6, 20.0])
def test_a_cpu_that_emulates_bf16_runs_the_small_rows_by_default(tmp_path, monkeypatch, slowdown):
    """Where a bf16 matmul takes EMULATED_BF16× an fp32 one or more, the default CPU run keeps to
    widths ÷8 and the algorithms section's fp32 points (the full bf16 rows would take hours), and
    says so; elsewhere it runs every width and dtype."""
    import run

    planned, work_plan = [], run.work_plan
    monkeypatch.setattr(run, "bf16_slowdown", lambda: slowdown)
    monkeypatch.setattr(run, "work_plan", lambda *args: planned.append(args[4:]) or [])
    monkeypatch.setitem(sys.modules, "plots", type(sys)("plots"))
    sys.modules["plots"].draw = lambda result, stem: []
    assert run.main(["--out-dir", str(tmp_path)]) == 0
    emulated = slowdown > run.EMULATED_BF16
    assert planned == [((8,), 1, ("float32",)) if emulated else ((8, 4, 1), 1, ("float32", "bfloat16", "float16"))]
    [path] = tmp_path.glob("*.json")
    assert any("emulates bf16" in n for n in json.loads(path.read_text())["notes"]) == emulated
    fp32_only = work_plan(torch.device("cpu"), ["algorithms"], [], True, algorithm_dtypes=("float32",))
    assert [p for _, p in fp32_only] == [p for p in ns_algorithms.points(torch.device("cpu")) if p[2] == "float32"]


def test_a_failing_item_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """One item raising (an out-of-memory model, a backend error) must not cost the items after it:
    the error is in the JSON (and the summary), the rows already done stay."""
    import run

    def flaky_ns(device, *, todo, **kw):
        if todo[0][0] == 40:
            raise RuntimeError("CUDA out of memory")
        return [{"shape": list(todo[0][:2]), "batch": todo[0][2], "impl": "ours-torch", "ms": 1.0, "samples": [1.0],
                 "tflops": 1.0, "mm_peak_tflops": 2.0, "fraction_of_peak": 0.5}], []

    def rows_then_failure(device, *, models, on_row, **kw):
        on_row({"model": models[0], "impl": "torch.optim.Muon", "ms": 3.0, "width_divisor": 8, "layers": 12,
                "layers_run": 12, "extra_memory_bytes": None, "samples": [3.0]})
        raise RuntimeError("the second row failed")

    monkeypatch.setattr(run.newton_schulz, "points", lambda device, quick: [(40, 96, 1), (64, 128, 1)])
    monkeypatch.setattr(run.newton_schulz, "run", flaky_ns)
    monkeypatch.setattr(run.step, "run", rows_then_failure)
    monkeypatch.setitem(sys.modules, "plots", type(sys)("plots"))
    sys.modules["plots"].draw = lambda result, stem: []
    argv = ["--sections", "ns", "step", "--out-dir", str(tmp_path), "--models", "gpt2-small", "--width-divisor", "8"]
    assert run.main(argv) == 0
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert [e[:2] for e in result["errors"]] == [["step", ["gpt2-small", 8]], ["ns", [40, 96, 1]]]
    assert "out of memory" in result["errors"][1][2] and result["complete"] is False
    assert [r["shape"] for r in result["ns"]] == [[64, 128]]  # the item after the failure ran
    assert [r["impl"] for r in result["step"]] == ["torch.optim.Muon"]  # the row done before it stays


def _failing_build(mats, vecs):
    raise RuntimeError("this backend's first GPU run failed")


def test_a_failing_step_row_costs_only_itself(tmp_path, monkeypatch):
    """In a one-shot GPU window a row that raises (a backend running there for the first time) must
    not cost the rows after it in its item: it is recorded under ``errors`` with its implementation,
    the item's other rows and the reference still come back, and the run goes on."""
    import run
    import step

    every = step.implementations

    def with_a_failing_row(device, quick, width_divisor=1, group=None, model=None):
        impls = dict(every(device, quick, width_divisor, group, model))
        return [("torch.optim.Muon", impls["torch.optim.Muon"]), ("ours-broken", _failing_build),
                ("ours-torch", impls["ours-torch"])]

    monkeypatch.setattr(step, "implementations", with_a_failing_row)
    monkeypatch.setitem(sys.modules, "plots", type(sys)("plots"))
    sys.modules["plots"].draw = lambda result, stem: []
    argv = ["--sections", "step", "--out-dir", str(tmp_path), "--models", "gpt2-small", "--width-divisor", "8",
            "--no-phases"]
    assert run.main(argv) == 0
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert [e[:2] for e in result["errors"]] == [["step", ["gpt2-small", 8, "ours-broken"]]]
    assert "first GPU run failed" in result["errors"][0][2] and result["complete"] is False
    assert [r["impl"] for r in result["step"]] == ["torch.optim.Muon", "ours-torch"]
    assert [r["impl"] for r in result["step_speedups"]] == ["ours-torch"]
    # Without on_error the row's exception propagates, as before.
    with pytest.raises(RuntimeError, match="first GPU run failed"):
        step.run(torch.device("cpu"), models=["gpt2-small"], width_divisor=8, quick=True, warmup=0, repeat=1,
                 progress=lambda text: None, phases=False)


def test_a_gpu_step_row_records_what_each_bucket_ran(monkeypatch):
    """The GPU rows (timed one by one; torch.cuda's memory counters stubbed here) say which backend and
    kernel path each bucket ran, and why: an "auto" row's measured choice, which a graph row makes
    from graph replays and so may differ. A failing row in the middle costs only itself."""
    import step

    impls = dict(step.implementations(torch.device("cpu"), True, 8))
    monkeypatch.setattr(step, "implementations", lambda *args: [
        ("torch.optim.Muon", impls["torch.optim.Muon"]), ("ours-broken", _failing_build),
        ("ours-torch", impls["ours-torch"])])
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    failed = []
    rows = list(step._one_by_one(torch.device("cpu"), "gpt2-small", 1, 8, True, 1, 1, lambda text: None,
                                 on_error=lambda impl, exc: failed.append(impl)))
    assert [r["impl"] for r in rows] == ["torch.optim.Muon", "ours-torch"] and failed == ["ours-broken"]
    assert "plan" not in rows[0]
    # GPT-2 small ÷8, one layer: the attention output 96², the fused QKV 288×96 and the MLP's two
    # matrices, 384×96 and 96×384, in one bucket (each oriented wide).
    plan = rows[1]["plan"]
    assert sorted((tuple(b["shape"]), b["matrices"], b["backend"]) for b in plan) == [
        ((96, 96), 1, "torch"), ((96, 288), 1, "torch"), ((96, 384), 2, "torch")]
    assert all(b["why"] for b in plan)


def test_a_failing_update_row_costs_only_itself(monkeypatch):
    import update

    failed = []
    monkeypatch.setattr(update, "_ours", _failing_build)
    rows = update.run(torch.device("cpu"), model="gpt2-small", width_divisor=8, warmup=0, repeat=1,
                      progress=lambda text: None, on_error=lambda impl, exc: failed.append((impl, str(exc))))
    assert failed == [("ours-torch", "this backend's first GPU run failed")]
    assert [r["impl"] for r in rows] == ["torch.optim.Muon"] and rows[0]["gbps"] > 0


def test_targets_parse_and_measure():
    import gpu_check

    targets = gpu_check.load_targets()
    assert {t["kind"] for t in targets} == set(gpu_check.TARGET_KINDS)
    result = {
        "step_speedups": [{"model": "gpt2-small", "impl": "ours-triton", "speedup": 5.4},
                          {"model": "gpt2-small", "impl": "ours-auto", "speedup": 4.1}],
        "ns": [{"shape": [4096, 4096], "batch": 1, "impl": "cublas-recurrence", "ms": 13.0},
               {"shape": [4096, 4096], "batch": 1, "impl": "torch.optim.Muon", "ms": 11.7},
               {"shape": [4096, 4096], "batch": 1, "impl": "ours-triton", "ms": 10.0},
               {"shape": [4096, 4096], "batch": 1, "impl": "ours-cuda", "ms": 20.0},
               {"shape": [4096, 4096], "batch": 1, "impl": "ours-cuda-sm75", "ms": 9.0},
               {"shape": [1024, 4096], "batch": 1, "impl": "torch.optim.Muon", "ms": 0.3},
               {"shape": [1024, 4096], "batch": 1, "impl": "ours-torch", "ms": 0.4},
               {"shape": [1024, 4096], "batch": 1, "impl": "ours-triton-gram", "ms": 0.2}],
        "update": [{"model": "gpt2-small", "impl": "ours-triton", "fraction_of_copy": 0.7}],
    }
    result["step_speedups"].append({"model": "gpt2-small", "impl": "ours-auto-bf16-params", "speedup": 5.5})
    result["step"] = [{"model": "gpt2-small", "width_divisor": 1, "impl": "ours-triton", "ms": 3.0},
                      {"model": "gpt2-small", "width_divisor": 1, "impl": "ours-triton-cautious", "ms": 3.2},
                      {"model": "gpt2-small", "width_divisor": 4, "impl": "ours-triton-normuon-hyperball", "ms": 1.0},
                      {"model": "gpt2-small", "width_divisor": 1, "impl": "ours-triton-normuon-hyperball", "ms": 4.0},
                      {"model": "gpt2-small", "width_divisor": 1, "impl": "ours-torch-int8-momentum", "ms": 9.0}]
    result["ns"] += [{"shape": [4096, 4096], "batch": 1, "impl": "ours-auto", "ms": 12.0},
                     {"shape": [1024, 4096], "batch": 1, "impl": "ours-auto", "ms": 0.6}]
    measured = {t["name"]: gpu_check.measure(t, result) for t in targets}
    assert measured["Muon.step() GPT-2 small, backend=auto, vs torch.optim.Muon + AdamW"] == (4.1, "ours-auto")
    assert measured["Muon.step() GPT-2 small, bf16 parameters, backend=auto, vs torch.optim.Muon + AdamW"] == (
        5.5, "ours-auto-bf16-params")
    # variants against their backend's default row, full width only
    assert measured["GPT-2 small step, cautious weight decay within 10% of the default (Triton)"] == (
        pytest.approx(3.0 / 3.2), "ours-triton-cautious vs ours-triton")
    assert measured["GPT-2 small step, NorMuon + hyperball within 10% of the default (Triton)"][0] == 0.75
    assert measured["GPT-2 small step, int8 momentum within 10% of the default (Triton)"] == (None, "not measured")
    assert measured["GPT-2 small step, int8 momentum no slower than the default (torch backend)"] == (
        None, "not measured")  # no ours-torch row
    # backend="auto"'s worst point: 1024x4096 (0.3 / 0.6), not 4096² (11.7 / 12.0)
    assert measured["Newton-Schulz, backend=auto, worst bench point vs the faster reference"] == (
        0.5, "ours-auto at 1024x4096 x 1, the worst of 2 points")
    assert measured["Muon.step() LLaMA-1B, backend=auto, vs torch.optim.Muon + AdamW"] == (None, "not measured")
    # against the faster reference (torch.optim.Muon's 11.7 ms here)
    assert measured["Newton-Schulz 4096x4096"] == (pytest.approx(1.17), "ours-triton vs torch.optim.Muon")
    assert measured["Newton-Schulz 8192x8192"] == (None, "not measured")
    # The CUDA fallback's own targets: that implementation alone, against the cuBLAS recurrence; the
    # forced sm75 path never counts for the general target (no user gets it by default there).
    cuda = "CUDA fallback (native sm80 path) Newton-Schulz 4096x4096 vs the cuBLAS recurrence"
    assert measured[cuda] == (pytest.approx(0.65), "ours-cuda vs cublas-recurrence")
    sm75 = "CUDA fallback (MUON_KERNELS_CUDA_PATH=sm75) Newton-Schulz 4096x4096 vs the cuBLAS recurrence"
    assert measured[sm75] == (pytest.approx(13.0 / 9.0), "ours-cuda-sm75 vs cublas-recurrence")
    assert measured["CUDA fallback (native sm80 path) Newton-Schulz 48 x 768x768 vs the cuBLAS recurrence"] == (
        None, "not measured")
    # Gram rows count where the target allows them
    assert measured["Newton-Schulz 1024x4096 (Gram allowed)"] == (pytest.approx(1.5), "ours-triton-gram vs torch.optim.Muon")
    assert measured["elementwise update, fraction of device copy bandwidth (GPT-2 small)"] == (0.7, "ours-triton")


def test_bad_target_list_is_refused(tmp_path):
    import gpu_check

    bad = tmp_path / "targets.json"
    bad.write_text(json.dumps({"targets": [{"name": "x", "kind": "ns_speedup", "min": 1.0}]}))
    with pytest.raises(ValueError, match="lacks"):
        gpu_check.load_targets(bad)


def test_gpu_check_splits_its_budget_and_summarizes(tmp_path):
    import gpu_check

    clock = FakeClock()
    calls = []

    def runner(cmd, log, timeout, env):  # called from two threads while the tests run
        side = "gpu/test_cuda_gpu.py" in cmd
        calls.append((cmd, timeout, env.get("MUON_KERNELS_DEBUG_FILL")))
        if not side:  # the side tests run beside the main ones: they take no time of their own
            clock.now += 100.0
        assert ("MUON_KERNELS_TEST_PROGRESS" in env) == ("pytest" in cmd)
        # the tests' dispatch choices stay in the output folder, out of the bench's way
        assert (env.get("MUON_KERNELS_DISPATCH_CACHE") == str(tmp_path / "tests-dispatch" / "dispatch.json")) == (
            "pytest" in cmd)
        # a summary of the tests is there before the bench starts
        summary = tmp_path / "summary.md"
        assert ("8 tests, 1 failures" in (summary.read_text() if summary.exists() else "")) != ("pytest" in cmd)
        if side:
            (tmp_path / "pytest-gpu-side.xml").write_text('<testsuite tests="3" failures="0" errors="0" skipped="0"/>')
        elif "pytest" in cmd:
            (tmp_path / "pytest-gpu.xml").write_text(
                '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>')
        else:
            (tmp_path / "nvidia-h200-2026-12-03-abc.json").write_text(json.dumps(
                {"device": "NVIDIA H200", "complete": False, "skipped": [["step", "gpt2-xl"]],
                 "step_speedups": [{"model": "gpt2-small", "impl": "ours-auto", "speedup": 5.2}]}))
        log.write_text("log")
        return 0

    assert gpu_check.main(["--out", str(tmp_path), "--minutes", "8"], runner=runner, clock=clock) == 0
    tests, (bench_cmd, _, bench_fill) = calls[:2], calls[2]
    (side_cmd, side_timeout, side_fill), = [c for c in tests if "gpu/test_cuda_gpu.py" in c[0]]
    (tests_cmd, tests_timeout, fill), = [c for c in tests if "gpu/test_cuda_gpu.py" not in c[0]]
    files = [a for a in tests_cmd if a.startswith("gpu/")]
    side_files = [a for a in side_cmd if a.startswith("gpu/")]
    assert files[0] == "gpu/test_triton_gpu.py" and side_files == ["gpu/test_cuda_gpu.py", "gpu/test_sanitizer.py"]
    assert sorted(files + side_files) == sorted(f"gpu/{p.name}" for p in (Path(__file__).parent / "gpu").glob("test_*.py"))
    assert "pytest" in tests_cmd and fill == side_fill == "nan"
    assert tests_timeout == side_timeout == pytest.approx(0.45 * 480)
    assert "pytest-gpu-side.xml" in " ".join(side_cmd) and "pytest-gpu.xml" in " ".join(tests_cmd)
    assert bench_fill is None  # timings without the debug fill
    budget = float(bench_cmd[bench_cmd.index("--budget-minutes") + 1])
    assert budget == pytest.approx((480 - 100) / 60 - 1.5, abs=0.01)
    text = (tmp_path / "summary.md").read_text()
    assert "8 tests, 1 failures, 0 errors, 1 skipped" in text  # both processes' XMLs
    assert "| 5.2 | ours-auto | met |" in text and "not measured" in text


def _step_with_a_child(pid_file: Path) -> list[str]:
    """A step that starts a child process (as the sanitizer tests do), writes its pid and waits."""
    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    return [sys.executable, "-c", script]


def test_gpu_check_stops_a_step_with_the_processes_it_started(tmp_path):
    """At its timeout a step is killed with its children (a compute-sanitizer run, a resumed
    training): nothing it started may hold the GPU while the bench measures."""
    import gpu_check

    pid_file = tmp_path / "child.pid"
    log = tmp_path / "log.txt"
    start = time.monotonic()
    # 8 s: the step and its child start (two Python start-ups) and write the pid well before it
    assert gpu_check._run(_step_with_a_child(pid_file), log, 8.0, dict(os.environ)) == 124
    assert time.monotonic() - start < 30 and "stopped after 8 s" in log.read_text()
    _assert_gone(pid_file)


def test_a_sigterm_stops_the_running_step_with_its_processes(tmp_path):
    """`timeout` signals gpu-check's process group, not the step's own session: gpu-check's handler
    stops the step and everything it started, and the run still writes its summary."""
    import threading

    import gpu_check

    pid_file = tmp_path / "child.pid"
    previous = signal.signal(signal.SIGTERM, gpu_check._stop)
    timer = threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(gpu_check.Stopped):
            gpu_check._run(_step_with_a_child(pid_file), tmp_path / "log.txt", 60.0, dict(os.environ))
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert "stopped with gpu-check" in (tmp_path / "log.txt").read_text()
    _assert_gone(pid_file)

    def stopped_in_the_tests(cmd, log, timeout, env):
        raise gpu_check.Stopped("stopped by signal 15")

    assert gpu_check.main(["--out", str(tmp_path / "out")], runner=stopped_in_the_tests) == 1
    assert "stopped by signal 15 during the tests" in (tmp_path / "out" / "summary.md").read_text()


def test_a_sigterm_during_the_tests_stops_both_test_processes(tmp_path):
    """The signal reaches gpu-check's main thread, which runs the main tests' step while a thread
    waits on the side tests' one: both steps and what they started are stopped, the summary written."""
    import threading

    import gpu_check

    pids = {"main": tmp_path / "main.pid", "side": tmp_path / "side.pid"}

    def runner(cmd, log, timeout, env):  # each test process replaced by a step that starts a child
        which = "side" if "gpu/test_cuda_gpu.py" in cmd else "main"
        return gpu_check._run(_step_with_a_child(pids[which]), log, timeout, env)

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installs its own handler
    timer = threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert gpu_check.main(["--out", str(tmp_path / "out"), "--minutes", "5"], runner=runner) == 1
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert "stopped by signal 15 during the tests" in (tmp_path / "out" / "summary.md").read_text()
    for pid_file in pids.values():
        _assert_gone(pid_file)


def test_gpu_check_reports_only_its_own_run(tmp_path, monkeypatch):
    """A rerun into the same folder (a warm machine keeps it) never reports the earlier run's test
    counts or bench JSON; the budget counts from --started (before the build); the commit label is
    checked before anything runs and written into the summary."""
    import gpu_check

    (tmp_path / "pytest-gpu.xml").write_text('<testsuite tests="9" failures="0" errors="0" skipped="0"/>')
    old = tmp_path / "nvidia-h200-2026-12-03-abc1234.json"
    old.write_text(json.dumps({"device": "NVIDIA H200", "step_speedups": []}))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    timeouts = []

    def runner(cmd, log, timeout, env):
        timeouts.append(timeout)
        return 124

    monkeypatch.setenv("MUON_KERNELS_COMMIT", "abc1234-dirty")
    started = time.time() - 60.0
    assert gpu_check.main(["--out", str(tmp_path), "--minutes", "8", "--started", str(started),
                           "--tests-share", "0.5"], runner=runner) == 1
    assert timeouts[0] == pytest.approx(0.5 * (480 - 60), abs=2.0)
    text = (tmp_path / "summary.md").read_text()
    assert "no bench result" in text and "commit: abc1234-dirty" in text
    assert "9 tests" not in text and "pytest-gpu.xml, pytest-gpu-side.xml missing" in text
    # A build that outlasted the budget leaves a minute, said in the summary with the Makefile's note.
    assert gpu_check.main(["--out", str(tmp_path), "--minutes", "8", "--started", str(time.time() - 600),
                           "--note", "the install with _C for sm_90 failed (build.log)"], runner=runner) == 1
    assert timeouts[3] == timeouts[4] == pytest.approx(0.45 * 60)  # the second run's two test processes
    text = (tmp_path / "summary.md").read_text()
    assert "the install with _C for sm_90 failed" in text and "one minute left" in text
    monkeypatch.setenv("MUON_KERNELS_COMMIT", "../main")
    with pytest.raises(ValueError, match="MUON_KERNELS_COMMIT"):
        gpu_check.main(["--out", str(tmp_path)], runner=runner)
    assert len(timeouts) == 6  # nothing ran


def _assert_gone(pid_file: Path) -> None:
    assert pid_file.exists(), "the step was stopped before it started its child: raise the timeout"
    child = int(pid_file.read_text())
    for _ in range(100):  # killed; reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the step's child process {child} outlived the step")


def test_gpu_tests_stopped_by_the_budget_still_report_each_outcome(tmp_path):
    """A pytest run killed at its share of the budget writes no junit XML: the progress log that
    tests/conftest.py appends to as each test ends is what the summary counts."""
    import gpu_check

    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_some.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'wrong bits'\n"
        "@pytest.mark.skip(reason='needs a CUDA device')\n"
        "def test_skipped(): pass\n")
    (tests / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, MUON_KERNELS_TEST_PROGRESS=str(out / gpu_check.PROGRESS))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], env=env,
                   capture_output=True, check=False)
    lines = [line.split("\t") for line in (out / gpu_check.PROGRESS).read_text().splitlines()]
    assert [(o, n.split("::")[-1]) for o, n, *_ in lines] == [("passed", "test_ok"), ("failed", "test_bad"),
                                                              ("skipped", "test_skipped")]
    assert "wrong bits" in lines[1][3] and "needs a CUDA device" in lines[2][3]
    counts = gpu_check.test_counts([out / "pytest-gpu.xml"], out / gpu_check.PROGRESS)
    assert (counts["tests"], counts["failures"], counts["skipped"]) == (3, 1, 1) and "stopped" in counts["note"]


# ---------------------------------------------------------------- option measurements (docs/newton_schulz.md)
def _check_accuracy_data(data: dict, inputs: int) -> None:
    """What the defaults claim of bench/ns_accuracy.py's data: unrestarted 16-bit Gram blows up somewhere
    (error > 1), the default schedule never strays past 2× standard NS's own error + 1e-2 at the same
    dtype (5-step rows), and fp32 stays within 5e-3."""
    rows = [r for r in data["restarts"] if r["steps"] == 5]
    assert any(r["gram"]["[]"] > 1 for r in rows if r["dtype"] != "float32")
    for r in rows:
        default = next(v for k, v in r["gram"].items() if k.startswith("default"))
        if r["dtype"] == "float32":
            assert default <= 5e-3, r
        else:
            assert default <= 2 * r["standard"] + 1e-2, r
    methods = {r["method"] for r in data["aol"]}
    assert "AOL + turbo (flash-newton-schulz), 4 steps" in methods and len(methods) == 6
    # Gram by preset: with the default restarts every preset stays inside DESIGN.md §5's band in fp16,
    # and in bf16 exactly the coefficient sets recurrence.gram_outside_band names do not (so "auto"
    # keeps standard NS for those and only those).
    from muon_kernels import recurrence
    from muon_kernels.ns_config import resolve_ns_config

    defaults = [r for r in data["presets"] if r["restarts"] == "default"]
    assert {(r["preset"], r["dtype"]) for r in defaults} == {
        (p, d) for p in ("keller", "quintic", "polar_express", "turbo") for d in ("bfloat16", "float16")}
    for r in defaults:
        assert r["inputs"] == inputs, r
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[r["dtype"]]
        outside = recurrence.gram_outside_band(resolve_ns_config(r["preset"], None, 1e-7), dtype)
        assert (r["over_band"] > 0) == outside, r
        assert r["worst_ratio"] <= 0.6 or outside, r


def test_accuracy_script_backs_the_default_restarts(tmp_path):
    """bench/ns_accuracy.py reruns its tables (--quick: the preset table over 3 shapes × 3 seeds × 4
    spectra, without its largest shape, whose emulated 16-bit GEMMs are 4/5 of the CPU time); the
    fresh data shows what the defaults claim."""
    out = tmp_path / "acc.json"
    subprocess.run([sys.executable, "ns_accuracy.py", "--quick", "--out", str(out)], cwd=BENCH, check=True,
                   timeout=600, capture_output=True)
    _check_accuracy_data(json.loads(out.read_text()), inputs=3 * 3 * 4)


def test_committed_accuracy_table_backs_the_default_restarts():
    """The committed full run (bench/results/cpu/ns_accuracy.json, 4 shapes up to 256×1024, which
    docs/newton_schulz.md quotes) shows the same."""
    _check_accuracy_data(json.loads((BENCH / "results" / "cpu" / "ns_accuracy.json").read_text()), inputs=4 * 3 * 4)


def test_option_convergence_script_runs(tmp_path):
    out = tmp_path / "conv.json"
    subprocess.run([sys.executable, "option_convergence.py", "--steps", "3", "--seeds", "0", "1", "--configs",
                    "gram", "cautious-wd0.1", "--out", str(out)], cwd=BENCH, check=True, timeout=600, capture_output=True)
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"gram", "cautious-wd0.1"}
    for result in data["results"].values():
        assert len(result["runs"]) == 2 and result["summary"]["train_loss"]["mean"] > 0


@pytest.mark.parametrize("variant, launches", [("default", 3 * 19), ("normuon-hyperball", 3 * 21)])
def test_host_time_script_counts_the_launches_of_a_step(variant, launches):
    """bench/host_time.py (launches stubbed under the interpreter): GPT-2 small's three buckets, each
    4 + 3·5 Triton launches (+ statistics and factors with NorMuon/hyperball), whatever the layers."""
    import os

    for layers in ("1", "2"):
        run = subprocess.run([sys.executable, "host_time.py", "--layers", layers, "--steps", "2", "--width-divisor", "1",
                              "--variant", variant], cwd=BENCH, check=True, timeout=600, capture_output=True,
                             text=True, env=dict(os.environ, TRITON_INTERPRET="1"))
        assert f", {launches} Triton launches, " in run.stdout, run.stdout
        assert "ms of host time per step" in run.stdout


def test_step_memory_script_finds_the_largest_buckets_working_set():
    """bench/step_memory.py (stand-in launchers): a GPT-2-small step's peak is its largest bucket's
    fp32 stack, one bf16 m×n iterate (the other lies in the stack's memory, which the step gives up)
    and two bf16 m×m products, exactly; with a cap of two of its matrices, half of that (the bucket
    is planned as two)."""
    sys.path.insert(0, str(BENCH))
    import step_memory

    r = step_memory.measure("gpt2-small", 2, 2**30)
    k, m, n = 4, 768, 3072
    assert r["buckets"][-1][:3] == (k, m, n)
    assert r["peak_mib"] * 2**20 == k * (4 * m * n + 2 * (m * n + 2 * m * m))
    capped = step_memory.measure("gpt2-small", 2, 2 * (4 * m * n + 2 * (2 * m * n + 2 * m * m)))
    assert [b[0] for b in capped["buckets"]] == [2, 2, 2, 2]
    assert capped["peak_mib"] == r["peak_mib"] / 2
