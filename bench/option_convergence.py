"""Training with each optimizer option on the tiny character transformer (bench/convergence_tasks.py),
the same seeds, batches and learning rate for each, bf16 iteration (the default):

- Newton–Schulz algorithms (weight decay 0): standard NS (keller, 5 steps), Gram NS (the same
  coefficients and steps, default restarts), Turbo (AOL preconditioning, 4 steps);
- weight decay 0.1: decoupled (torch.optim.Muon's) and cautious (arXiv 2510.12402);
- variants (weight decay 0): NorMuon (adaptive="normuon"), hyperball (constraint="hyperball");
- momentum precision (weight decay 0; "standard" is the fp32 momentum): bf16 rounded to nearest or
  stochastically, int8 (blocks of 256) rounded to nearest or stochastically.

Writes the final train/test losses per seed and their mean and spread to
bench/results/cpu/option_convergence.json, merged into the results already there (so a run of
some configs keeps the others').

    python bench/option_convergence.py [--steps 600] [--seeds 0 1 2] [--configs standard gram ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import muon_kernels as mk
from convergence_tasks import CharTransformerTask

CONFIGS = {
    "standard": {"ns_coefficients": "keller", "weight_decay": 0.0},
    "gram": {"ns_coefficients": "keller", "ns_algorithm": "gram", "weight_decay": 0.0},
    "turbo-aol-4": {"ns_coefficients": "turbo", "weight_decay": 0.0},
    "decoupled-wd0.1": {"weight_decay": 0.1},
    "cautious-wd0.1": {"weight_decay": 0.1, "weight_decay_mode": "cautious"},
    "normuon": {"ns_coefficients": "keller", "weight_decay": 0.0, "adaptive": "normuon"},
    "hyperball": {"ns_coefficients": "keller", "weight_decay": 0.0, "constraint": "hyperball"},
    "momentum-bf16": {"ns_coefficients": "keller", "weight_decay": 0.0, "momentum_dtype": torch.bfloat16},
    "momentum-bf16-stochastic": {"ns_coefficients": "keller", "weight_decay": 0.0, "momentum_dtype": torch.bfloat16,
                                 "momentum_rounding": "stochastic"},
    "momentum-int8": {"ns_coefficients": "keller", "weight_decay": 0.0, "momentum_dtype": "int8"},
    "momentum-int8-stochastic": {"ns_coefficients": "keller", "weight_decay": 0.0, "momentum_dtype": "int8",
                                 "momentum_rounding": "stochastic"},
}
OUT = Path(__file__).resolve().parent / "results" / "cpu" / "option_convergence.json"


def train(task: CharTransformerTask, config: dict, seed: int, steps: int) -> dict:
    model = task.make_model(seed)
    opt = mk.Muon(task.param_groups(model), lr=task.lr, adamw_lr=task.adamw_lr, backend="torch", **config)
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        idx = torch.randint(0, task.num_samples, (task.base_batch,), generator=g)
        task.loss(model, idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return {"seed": seed, "train_loss": task.full_loss(model).item(), **task.test_metrics(model)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    task = CharTransformerTask()
    results = json.loads(args.out.read_text())["results"] if args.out.exists() else {}
    for name in args.configs:
        config = CONFIGS[name]
        start = time.perf_counter()
        runs = [train(task, config, seed, args.steps) for seed in args.seeds]
        summary = {}
        for key in ("train_loss", "test_loss"):
            values = [r[key] for r in runs]
            summary[key] = {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "min": min(values), "max": max(values)}
        shown = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in config.items()}
        results[name] = {"config": shown, "runs": runs, "summary": summary, "seconds": time.perf_counter() - start}
        print(name, json.dumps(summary), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"task": task.name, "steps": args.steps, "batch": task.base_batch,
                                    "lr": task.lr, "ns_dtype": "bfloat16", "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
