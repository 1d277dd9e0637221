"""Full optimizer step: muon_kernels.Muon (every backend that can run here) vs torch.optim.Muon + AdamW.

All implementations step the same parameters with the same gradients in one process, so the
speedup column is a side-by-side ratio. On a GPU the shapes are the real model's; on a CPU this
is a smoke run (labelled ``quick``): the width is divided by 8 and the CPU's slow bf16 GEMM is
shown beside an fp32 iteration.

    python bench/step.py [--models gpt2-small ...] [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import muon_kernels as mk
from common import MODELS, RESULTS_DIR, environment, layer_shapes, summarize, table, time_call, write_results


def make_params(model: str, layers: int, width_divisor: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    matrices, vectors = layer_shapes(model, width_divisor)
    mats, vecs = [], []
    for _ in range(layers):
        mats += [torch.nn.Parameter((torch.randn(s, generator=g) / s[1] ** 0.5).to(device)) for s in matrices]
        vecs += [torch.nn.Parameter(torch.zeros(n).to(device)) for n in vectors]
    for p in mats + vecs:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return mats, vecs


def implementations(device: torch.device, quick: bool):
    """(name, build(mats, vecs) -> step callable) for everything that can run on ``device``."""

    def ours(backend, **kw):
        def build(mats, vecs):
            opt = mk.Muon([{"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False}], lr=0.02,
                          backend=backend, **kw)
            return opt.step
        return build

    def reference(mats, vecs):
        muon = torch.optim.Muon(mats, lr=0.02)
        adamw = torch.optim.AdamW(vecs, lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)

        def step():
            muon.step()
            adamw.step()
        return step

    impls = [("torch.optim.Muon", reference)]
    for name, (ok, _) in mk.available_backends(device).items():
        if ok:
            impls.append((f"ours-{name}", ours(name)))
    if device.type == "cuda":
        impls.append(("ours-auto", ours("auto")))  # what a user gets: the dispatch table's choice per bucket
    if device.type == "cpu":
        impls.append(("ours-torch-fp32", ours("torch", ns_dtype=torch.float32)))
    return impls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-small"], choices=sorted(MODELS))
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run (always on for a CPU)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON result goes")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    width_divisor = 8 if device.type == "cpu" else 1
    repeat = args.repeat or (3 if quick else 20)
    warmup = args.warmup or (1 if quick else 5)
    env = environment(device)
    print(f"device: {env['device']}  torch {env['versions']['torch']}  triton {env['versions']['triton']}"
          f"  commit {env['commit']}  quick={quick}")
    print("backends:", {k: v[1] for k, v in mk.available_backends(device).items()})

    results, rows = [], []
    for model in args.models:
        layers = MODELS[model]["layers"]
        label = model if width_divisor == 1 else f"{model}/width÷{width_divisor}"
        timings = {}
        for name, build in implementations(device, quick):
            mats, vecs = make_params(model, layers, width_divisor, device)
            step = build(mats, vecs)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            samples = time_call(step, device=device, warmup=warmup, repeat=repeat)
            extra = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
            timings[name] = summarize(samples)["ms"]
            results.append({"model": model, "impl": name, "width_divisor": width_divisor, "layers": layers,
                            **summarize(samples), "extra_memory_bytes": extra, "samples": samples})
            print(f"  {label:>24}  {name:<18} {timings[name]:10.2f} ms", file=sys.stderr, flush=True)
            del step, mats, vecs
        ref = timings["torch.optim.Muon"]
        for name, ms in timings.items():
            rows.append([label, name, f"{ms:.2f}", f"{ref / ms:.2f}x"])
    print()
    print(table(rows, ["model", "implementation", "ms/step", "speedup vs torch.optim.Muon"]))
    result = {**env, "quick": quick, "ns": [], "update": [], "step": results}
    print(f"\nwrote {write_results(result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
