"""`make bench`: Newton–Schulz throughput, fused-update bandwidth and full `Muon.step()` time,
ours against the references, side by side in one process on whatever device exists.

Writes bench/results/<device>-<date>-<commit>.json (every raw repetition under ``samples``) and,
with matplotlib installed, PNG plots beside it (bench/plots.py). On a CPU it is a smoke run
(``quick: true``): small shapes, widths divided by 8, wall-clock medians.

    python bench/run.py [--sections ns update step] [--models gpt2-small ...] [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import muon_kernels as mk
import newton_schulz
import step
import update
from common import MODELS, RESULTS_DIR, environment, table, write_results

SECTIONS = ("ns", "update", "step")
GPU_MODELS = ["gpt2-small", "gpt2-medium", "gpt2-xl", "llama-1b", "llama-7b"]


class Progress:
    """One status line on stderr: elapsed time and what is being measured."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()  # redraw one line on a terminal, a line per item in a log

    def __call__(self, text: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {text}"
        print(f"\r{line:<80}" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _ns_table(rows, speedups) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by = {(tuple(r["shape"]), r["batch"], r["impl"]): r for r in rows}
    best = {(tuple(s["shape"]), s["batch"], s["impl"]): s for s in speedups}
    peak = {tuple(r["shape"]): r["mm_peak_tflops"] for r in rows}
    out = []
    for shape, batch in dict.fromkeys((tuple(r["shape"]), r["batch"]) for r in rows):
        cells = [f"{shape[0]}x{shape[1]}", str(batch)]
        for impl in impls:
            r = by.get((shape, batch, impl))
            cells.append(f"{r['ms']:.3g} ms {r['tflops']:.3g} TF" if r else "-")
        mine = [s for k, s in best.items() if k[:2] == (shape, batch)]
        cells.append(", ".join(f"{s['impl']} {s['speedup']:.2f}x vs {s['best_reference']}" for s in mine) or "-")
        cells.append(f"{peak[shape]:.3g}")
        out.append(cells)
    return table(out, ["shape", "batch", *impls, "ours vs best reference", "bf16 mm TF"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS),
                        help="step models (default: all five on a GPU, gpt2-small on a CPU)")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer points and repetitions (always on for a CPU)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and plots go")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    width_divisor = 8 if device.type == "cpu" else 1
    repeat = args.repeat or (3 if quick else 20)
    warmup = args.warmup or (1 if quick else 5)
    models = args.models or (GPU_MODELS if device.type == "cuda" else ["gpt2-small"])
    env = environment(device)
    print(f"device: {env['device']}  torch {env['versions']['torch']}  triton {env['versions']['triton']}"
          f"  commit {env['commit']}  quick={quick}" + ("  (CPU smoke run)" if device.type == "cpu" else ""))
    print("backends:", {k: v[1] for k, v in mk.available_backends(device).items()})

    progress = Progress()
    result = {**env, "quick": quick, "ns": [], "ns_speedups": [], "update": [], "step": [], "step_speedups": [],
              "notes": []}
    if "ns" in args.sections:
        result["ns"], notes = newton_schulz.run(device, quick=quick, warmup=warmup, repeat=repeat, progress=progress)
        result["ns_speedups"] = newton_schulz.speedups(result["ns"])
        result["notes"] += notes
    if "update" in args.sections:
        for model in models:
            result["update"] += update.run(device, model=model, width_divisor=width_divisor, warmup=warmup,
                                           repeat=repeat, progress=progress)
    if "step" in args.sections:
        result["step"] = step.run(device, models=models, width_divisor=width_divisor, quick=quick, warmup=warmup,
                                  repeat=repeat, progress=progress)
        result["step_speedups"] = step.speedups(result["step"])
    progress.done()

    if result["ns"]:
        print("\nNewton–Schulz (5 keller steps, bf16 iteration; TF = effective TFLOP/s, naive FLOPs)")
        print(_ns_table(result["ns"], result["ns_speedups"]))
    if result["update"]:
        print("\nElementwise half of the step (momentum → stack, decay + update)")
        print(table([[r["model"], r["impl"], f"{r['ms']:.3g}", f"{r['gbps']:.3g}", f"{r['fraction_of_copy']:.2f}"]
                     for r in result["update"]], ["model", "implementation", "ms", "GB/s", "of copy"]))
    if result["step"]:
        ref = {r["model"]: r["ms"] for r in result["step"] if r["impl"] == "torch.optim.Muon"}
        label = lambda r: r["model"] + (f"/width÷{r['width_divisor']}" if r["width_divisor"] > 1 else "") + (  # noqa: E731
            f" ({r['layers_run']} of {r['layers']} layers, scaled)" if r["layers_run"] < r["layers"] else "")
        print("\nMuon.step()")
        print(table([[label(r), r["impl"], f"{r['ms']:.2f}", f"{ref[r['model']] / r['ms']:.2f}x",
                      "-" if r["extra_memory_bytes"] is None else f"{r['extra_memory_bytes'] / 2**20:.0f} MiB"]
                     for r in result["step"]],
                    ["model", "implementation", "ms/step", "speedup vs torch.optim.Muon", "extra memory"]))
    for note in result["notes"]:
        print("note:", note)
    path = write_results(result, args.out_dir)
    print(f"\nwrote {path}")
    try:
        import plots
    except ImportError:  # matplotlib is the optional `bench` extra
        print("plots: matplotlib is not installed (pip install .[bench])")
    else:
        for png in plots.draw(result, path.with_suffix("")):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
