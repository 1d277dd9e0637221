"""Convergence experiments for the predictions of DESIGN.md §6 (run by `make reproduce`).

1. Per task (digits MLP, stdlib char transformer): 4 LR schedules × 2 batch schedules × Nesterov
   on/off, each over several seeds, compared at an equal budget of gradient evaluations (samples
   processed) and, beside it, at an equal number of steps; plus constant batches of three sizes at
   equal steps (the "larger batch, lower floor" claim).
2. The low-rank quadratic: Muon vs gradient descent vs SGD with momentum at matched step budgets,
   each at its best peak lr from one grid, as the Hessian's rank varies.

Writes bench/results/convergence-<date>.json (raw curves) and, through convergence_report.py,
docs/convergence.md with its figures. ``--quick`` is the under-5-minutes version on 2 CPU cores;
``--smoke-steps N`` caps every run at N steps (tests). Those two modes write
``convergence-<date>-<mode>.json`` and their report into ``bench/results/convergence-<date>-<mode>/``
(or ``--docs-dir``), leaving the committed full-mode docs/convergence.md as it is.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import sys
import time
from pathlib import Path

import torch

import muon_kernels as mk
from common import REPO, RESULTS_DIR, environment
from convergence_tasks import TASKS, low_rank_quadratic, run_quadratic

LR_KINDS = ("constant", "cosine", "polynomial", "diminishing")
BATCH_KINDS = ("constant", "growing")
POLY_POWER = 2.0
GROWTH = 2.0

# Samples per run of the 16-configuration sweep, in passes over each task's training set.
BUDGET_EPOCHS = {"full": {"digits": 20, "chars": 4}, "quick": {"digits": 6, "chars": 2}, "smoke": {"digits": 1, "chars": 1}}
# Evaluation points per run (a full-batch gradient of the 1024-window chars set costs ~0.6 s on 2 cores).
EVALS = {"full": {"digits": 24, "chars": 12}, "quick": {"digits": 12, "chars": 6}, "smoke": {"digits": 3, "chars": 3}}
TASK_ARGS = {"full": {"digits": {}, "chars": {"train_windows": 1024}},
             "quick": {"digits": {}, "chars": {"train_windows": 512}},
             "smoke": {"digits": {}, "chars": {"train_windows": 128, "test_windows": 32}}}
SEEDS = {"full": 3, "quick": 1, "smoke": 1}
QUADRATIC = {"full": {"ranks": (1, 2, 4, 8, 16, 32), "seeds": 3, "steps": 100, "lrs": 13},
             "quick": {"ranks": (1, 4, 32), "seeds": 1, "steps": 50, "lrs": 7},
             "smoke": {"ranks": (1, 32), "seeds": 1, "steps": 20, "lrs": 3}}


def batch_schedule(kind: str, task, total_steps_const: int):
    """Constant ``base_batch``; or starting at a quarter of it, doubling every ~1/32 of the
    constant run's steps, capped at the whole training set (the deterministic limit)."""
    if kind == "constant":
        return mk.ConstantBatchSize(task.base_batch)
    return mk.ExponentialBatchSize(max(1, task.base_batch // 4), GROWTH, max(1, total_steps_const // 32),
                                   max_batch_size=min(task.num_samples, task.max_batch))


def steps_within(schedule, budget: int) -> int:
    """The most steps whose batches together stay within ``budget`` samples."""
    steps, used = 0, 0
    while used + schedule(steps) <= budget:
        used += schedule(steps)
        steps += 1
    return steps


def make_lr(kind: str, opt, steps: int):
    if kind == "polynomial":
        return mk.PolynomialLR(opt, steps, power=POLY_POWER)
    return mk.schedules.LR_SCHEDULES[kind](opt, steps)


def _eval_points(steps: int, count: int) -> list[int]:
    return sorted({round(steps * i / count) for i in range(count + 1)})


def measure(task, model) -> dict:
    """Full-training-set loss and gradient norm (of the tracked matrices), plus test metrics."""
    model.zero_grad(set_to_none=True)
    loss = task.full_loss(model)
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in task.tracked(model))).item()
    model.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": grad_norm, **task.test_metrics(model)}


def train(task, *, lr_kind: str, schedule, nesterov: bool, seed: int, steps: int, evals: int) -> list[dict]:
    """One run; returns the curve: a record per evaluation point (step, samples, lr, metrics)."""
    model = task.make_model(seed)
    opt = mk.Muon(task.param_groups(model), lr=task.lr, weight_decay=0.0, nesterov=nesterov,
                  ns_dtype=torch.float32, adamw_lr=task.adamw_lr, backend="torch")
    sched = make_lr(lr_kind, opt, steps)
    sampler = mk.ScheduledBatchSampler(task.num_samples, schedule, num_steps=steps, seed=seed)
    points = set(_eval_points(steps, evals))
    curve, samples = [], 0
    for t, idx in enumerate(sampler):
        if t in points:
            curve.append({"step": t, "samples": samples, "lr": opt.param_groups[0]["lr"], **measure(task, model)})
        task.loss(model, idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        samples += len(idx)
    curve.append({"step": steps, "samples": samples, "lr": opt.param_groups[0]["lr"], **measure(task, model)})
    return curve


def run_task(name: str, mode: str, smoke_steps: int | None, progress) -> dict:
    task = TASKS[name](**TASK_ARGS[mode][name])
    budget = BUDGET_EPOCHS[mode][name] * task.num_samples
    steps_const = budget // task.base_batch
    evals = EVALS[mode][name]
    runs = []

    def go(kind: str, view: str, lr_kind: str, batch_kind: str, batch_size: int | None, nesterov: bool,
           seed: int, schedule, steps: int):
        steps = min(steps, smoke_steps) if smoke_steps else steps
        t0 = time.perf_counter()
        curve = train(task, lr_kind=lr_kind, schedule=schedule, nesterov=nesterov, seed=seed, steps=steps,
                      evals=evals)
        runs.append({"experiment": kind, "view": view, "lr_schedule": lr_kind, "batch_schedule": batch_kind,
                     "batch_size": batch_size, "schedule": repr(schedule), "nesterov": nesterov, "seed": seed,
                     "steps": steps, "seconds": time.perf_counter() - t0, "curve": curve})
        progress(f"{name}: {kind}/{view} lr={lr_kind} batch={batch_kind} nesterov={nesterov} seed={seed} "
                 f"steps={steps} ({runs[-1]['seconds']:.1f}s)")

    for seed, lr_kind, batch_kind, nesterov in itertools.product(range(SEEDS[mode]), LR_KINDS, BATCH_KINDS,
                                                                 (True, False)):
        schedule = batch_schedule(batch_kind, task, steps_const)
        go("sweep", "equal-samples", lr_kind, batch_kind, None, nesterov, seed, schedule,
           steps_within(schedule, budget))
        if batch_kind == "growing":  # a constant batch's equal-steps run is its equal-samples run
            go("sweep", "equal-steps", lr_kind, batch_kind, None, nesterov, seed, schedule, steps_const)
    for seed, factor in itertools.product(range(SEEDS[mode]), (0.25, 1, 4)):
        size = max(1, int(task.base_batch * factor))
        go("batch-floor", "equal-steps", "constant", "constant", size, True, seed, mk.ConstantBatchSize(size),
           steps_const)
    return {"task": task.name, "key": name, "num_samples": task.num_samples, "budget_samples": budget,
            "base_batch": task.base_batch, "muon_lr": task.lr, "adamw_lr": task.adamw_lr, "runs": runs}


def run_quadratic_sweep(mode: str, progress) -> dict:
    cfg = QUADRATIC[mode]
    m = n = 32
    floor = 1e-2
    steps = cfg["steps"]
    lrs = torch.logspace(-3, 0.6, cfg["lrs"]).tolist()
    rows = []
    for rank, seed in itertools.product(cfg["ranks"], range(cfg["seeds"])):
        h, w_star, w0 = low_rank_quadratic(m, n, rank, floor, seed)
        for method in ("muon", "gd", "sgd-momentum"):
            ratios = [run_quadratic(method, lr, steps, h, w_star, w0) for lr in lrs]
            best = min(range(len(lrs)), key=lambda i: ratios[i])
            rows.append({"rank": rank, "seed": seed, "method": method, "best_lr": lrs[best],
                         "best_ratio": ratios[best], "ratios": ratios})
        progress(f"quadratic: rank={rank} seed={seed}")
    return {"m": m, "n": n, "floor": floor, "steps": steps, "lrs": lrs, "schedule": "cosine", "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced budgets and one seed (under 5 minutes)")
    parser.add_argument("--smoke-steps", type=int, default=None, help="cap every run at this many steps")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--docs-dir", type=Path, default=None,
                        help="where convergence.md and figures go (default: docs/ for a full run, a folder beside "
                             "the JSON for --quick and --smoke-steps)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke_steps else ("quick" if args.quick else "full")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()

    def progress(text):
        print(f"[{time.perf_counter() - start:7.1f}s] {text}", file=sys.stderr, flush=True)

    result = {**environment(torch.device("cpu")), "date": _dt.date.today().isoformat(), "mode": mode,
              "smoke_steps": args.smoke_steps, "lr_schedules": LR_KINDS, "polynomial_power": POLY_POWER,
              "growth": GROWTH, "tasks": [run_task(name, mode, args.smoke_steps, progress) for name in args.tasks],
              "quadratic": run_quadratic_sweep(mode, progress)}
    result["seconds"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"convergence-{result['date']}{'-' + mode if mode != 'full' else ''}.json"
    path.write_text(json.dumps(result) + "\n")
    print(f"raw curves: {path}")

    from convergence_report import write_report

    docs_dir = args.docs_dir or (REPO / "docs" if mode == "full" else args.out_dir / path.stem)
    doc = write_report(result, docs_dir, json_name=path.name)
    print(f"report: {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
