"""`make bench`: Newton–Schulz throughput, fused-update bandwidth and full `Muon.step()` time,
ours against the references, side by side in one process on whatever device exists.

Writes bench/results/<device>-<date>-<commit>.json (every raw repetition under ``samples``) and,
with matplotlib installed, PNG plots beside it (bench/plots.py). On a CPU (``quick: true``) the
Newton–Schulz and update sections are smoke runs (small shapes, widths divided by 8; the algorithm
section runs its full CPU shapes),
and the step section measures GPT-2 small and LLaMA-1B at widths ÷8, ÷4 and full (LLaMA-1B one of
its 16 layers there, scaled), each implementation interleaved with its own torch.optim.Muon twin.

    python bench/run.py [--sections ns algorithms update step] [--models gpt2-small ...] [--repeat N] [--quick]
                        [--width-divisor N ...] [--budget-minutes M]

Work runs in a fixed priority order (``work_plan``): on a GPU every target of bench/targets.json
first — GPT-2 small's default step rows (torch.optim.Muon, ours-auto, ours-auto-graph,
ours-triton), the five NS target points, LLaMA-1B's and GPT-2 medium's default step rows, the
update section on GPT-2 small — then those models' other step rows (backends, variants), then the
rest of the sweep. The JSON is rewritten (atomically) after every item and every step row, so it is
valid whenever the run stops; an item that raises is recorded under ``errors`` and the run goes
on; with ``--budget-minutes`` no new item starts once the budget is spent, and the JSON says what
was skipped (``complete: false``, ``skipped``). Budgeted runs leave out the NS section's
compiled-recurrence row (an inductor compile per shape).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import muon_kernels as mk
import newton_schulz
import ns_algorithms
import step
import update
import phases
from common import MODELS, RESULTS_DIR, bf16_slowdown, environment, layer_shapes, table, write_results

SECTIONS = ("ns", "algorithms", "update", "step")
GPU_MODELS = ["gpt2-small", "gpt2-medium", "gpt2-xl", "llama-1b", "llama-7b"]
# What a short GPU session must bring back first (bench/targets.json names them): oriented (m, n, batch).
PRIORITY_NS_POINTS = [(4096, 4096, 1), (1024, 4096, 1), (768, 768, 48), (8192, 8192, 1), (2048, 8192, 1)]
PRIORITY_MODELS = ["gpt2-small", "llama-1b"]  # also the CPU run's models
TARGET_MODELS = ["gpt2-small", "llama-1b", "gpt2-medium"]  # a GPU run's step targets, in this order
EMULATED_BF16 = 4.0  # a bf16 matmul this many times an fp32 one's time: bf16 is emulated on this CPU


class Budget:
    """Wall-clock budget for starting work items; ``clock`` is injectable for tests."""

    def __init__(self, minutes: float | None, clock=time.monotonic):
        self.clock = clock
        self.deadline = None if minutes is None else clock() + 60.0 * minutes

    def spent(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline


def work_plan(device: torch.device, sections, models: list[str], quick: bool,
              widths: tuple[int, ...] = (1,), algorithm_divisor: int = 1,
              algorithm_dtypes=("float32", "bfloat16", "float16")) -> list[tuple[str, object]]:
    """(section, what) items in priority order; each runs on its own and leaves a valid result.

    A step item is (model, width divisor) on a CPU, every width of a model in the order given (each
    row there is interleaved with its own reference twin, so a model's rows run together). On a GPU
    it is (model, width divisor, group): the model's default rows (``step.DEFAULT_IMPLS``:
    torch.optim.Muon, ours-auto, ours-auto-graph, ours-triton) are one item and the rest (other backends, variants)
    a later one, so a budgeted run reaches LLaMA-1B's default rows before any variant row (those
    took ~15 s each on an H200). Order on a GPU: GPT-2 small's defaults, every NS target point,
    LLaMA-1B's and GPT-2 medium's defaults, the update section's target model (GPT-2 small), the
    target models' other rows, the other update models, the algorithms, the rest of the NS sweep,
    then the other models (defaults first): every target is measured before any row no target reads."""
    items: list[tuple[str, object]] = []
    step_models = [m for m in models if "step" in sections]
    ns_points = newton_schulz.points(device, quick) if "ns" in sections else []
    first_ns = [p for p in PRIORITY_NS_POINTS if device.type == "cuda" and "ns" in sections]
    if device.type == "cuda":
        def steps(model_list, groups):
            return [("step", (m, w, g)) for g in groups for m in model_list for w in widths]
    else:
        def steps(model_list, groups):
            return [("step", (m, w)) for m in model_list for w in widths] if "default" in groups else []
    first = TARGET_MODELS if device.type == "cuda" else PRIORITY_MODELS
    priority = [m for m in first if m in step_models]
    others = [m for m in step_models if m not in first]
    update_models = [m for m in models if "update" in sections]
    items += steps(priority[:1], ["default"])
    items += [("ns", p) for p in first_ns]
    items += steps(priority[1:], ["default"])
    items += [("update", m) for m in update_models if m == "gpt2-small" and device.type == "cuda"]
    items += steps(priority, ["rest"])
    items += [("update", m) for m in update_models if ("update", m) not in items]
    if "algorithms" in sections:
        items += [("algorithms", p) for p in ns_algorithms.points(device, algorithm_divisor) if p[2] in algorithm_dtypes]
    items += [("ns", p) for p in ns_points if p not in first_ns]
    items += steps(others, ["default"]) + steps(others, ["rest"])
    return items


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


def _floors(model: str, width_divisor: int, ceilings: dict) -> list[dict]:
    """The step section's floors for ``model`` (every layer) on this device: fp32 and bf16 parameters."""
    matrices, vectors = layer_shapes(model, width_divisor)
    layers = MODELS[model]["layers"]
    return [{"model": model, "width_divisor": width_divisor, "param_dtype": dtype,
             **phases.floor(matrices * layers, vectors * layers, param_bytes, ceilings)}
            for dtype, param_bytes in (("fp32", 4), ("bf16", 2))]


def _phase_table(rows: list[dict]) -> str:
    """Per step row: wall, kernel and gap (GPU), and each phase (NS summed over buckets)."""
    out = []
    for r in rows:
        if "phases" not in r:
            continue
        b = r["phases"]
        totals: dict[str, list[float]] = {}
        for name, p in b["phases"].items():
            key = "ns" if name.startswith("ns") else name
            t = totals.setdefault(key, [0.0, 0.0])
            t[0] += p["device_ms"] or 0.0
            t[1] += p["host_ms"]
        cell = lambda k: "-" if k not in totals else (  # noqa: E731
            f"{totals[k][0]:.3g}/{totals[k][1]:.3g}" if "kernel_ms" in b else f"-/{totals[k][1]:.3g}")
        out.append([step.label(r), r["impl"], f"{b['wall_ms']:.3g}", f"{b.get('kernel_ms', float('nan')):.3g}",
                    f"{b.get('host_gap_ms', float('nan')):.3g}", *(cell(k) for k in ("momentum", "ns", "update", "adamw"))])
    return table(out, ["model", "implementation", "wall", "kernels", "gap", "momentum d/h", "NS d/h", "update d/h",
                       "AdamW d/h"])


def _run_item(section: str, what, result: dict, device, quick: bool, warmup: int, repeat: int, progress,
              with_phases: bool, widths, out_dir, compiled: bool = True) -> None:
    """One work item's rows into ``result`` (``compiled``: the NS section's torch.compile row, left out
    of budgeted runs). A step or update row that raises is recorded under ``errors`` and the item's
    other rows still run."""
    def row_failed(impl, exc):
        where = [*what, impl] if isinstance(what, tuple) else [what, impl]
        result["errors"].append([section, where, repr(exc)[:500]])
        print(f"\n{section} {where} failed: {exc!r}", file=sys.stderr)

    if section == "ns":
        rows, notes = newton_schulz.run(device, quick=quick, warmup=warmup, repeat=repeat, progress=progress,
                                        todo=[what], compiled=compiled)
        result["ns"] += rows
        result["ns_speedups"] = newton_schulz.speedups(result["ns"])
        result["notes"] += [n for n in notes if n not in result["notes"]]
    elif section == "algorithms":
        result["ns_algorithms"] += ns_algorithms.run(device, warmup=warmup, repeat=repeat, progress=progress,
                                                     todo=[what])
    elif section == "update":
        result["update"] += update.run(device, model=what, width_divisor=max(widths), warmup=warmup,
                                       repeat=repeat, progress=progress, on_error=row_failed)
    else:
        model, width_divisor, *group = what  # (model, width) on a CPU, (model, width, group) on a GPU

        def on_row(row):  # each row in the JSON as soon as it is done
            result["step"].append(row)
            result["step_speedups"] = step.speedups(result["step"])
            write_results(result, out_dir)

        step.run(device, models=[model], width_divisor=width_divisor, quick=quick, warmup=warmup, repeat=repeat,
                 progress=progress, group=(group or [None])[0], phases=with_phases, on_row=on_row,
                 on_error=row_failed)
        if result["ceilings"] and not any(f["model"] == model and f["width_divisor"] == width_divisor
                                          for f in result["floors"]):
            result["floors"] += _floors(model, width_divisor, result["ceilings"])


def main(argv=None, clock=time.monotonic) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS),
                        help="step models (default: all five on a GPU, gpt2-small and llama-1b on a CPU)")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer points and repetitions (always on for a CPU)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and plots go")
    parser.add_argument("--width-divisor", type=int, nargs="+", default=None,
                        help="divide model widths by these for the step section (default: 8 4 1 on a CPU, 1 on a "
                             "GPU; the largest also sets the update section's and, when given, the algorithms "
                             "section's: a smoke run, where a bf16 768×3072 call takes ~20 s on a CPU without "
                             "native bf16)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no new item after this many minutes (the JSON lists what was skipped)")
    parser.add_argument("--phases", action=argparse.BooleanOptionalAction, default=None,
                        help="per-phase breakdown of every step row beside the floor (default: on a GPU)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    # A CPU that emulates bf16 would spend hours on the full-width bf16 rows: by default it runs the
    # ÷8 step rows and the algorithms section's fp32 points (the note in the output says so).
    slowdown = bf16_slowdown() if device.type == "cpu" else 1.0
    emulated = slowdown > EMULATED_BF16
    widths = tuple(args.width_divisor or ((8,) if emulated else (8, 4, 1) if device.type == "cpu" else (1,)))
    algorithm_dtypes = ("float32",) if emulated and not args.width_divisor else ("float32", "bfloat16", "float16")
    repeat = args.repeat or (3 if quick else 20)
    warmup = args.warmup or (1 if quick else 5)
    models = args.models or (GPU_MODELS if device.type == "cuda" else PRIORITY_MODELS)
    env = environment(device)
    print(f"device: {env['device']}  torch {env['versions']['torch']}  triton {env['versions']['triton']}"
          f"  commit {env['commit']}  quick={quick}" + ("  (CPU smoke run)" if device.type == "cpu" else ""))
    print("backends:", {k: v[1] for k, v in mk.available_backends(device).items()})

    progress = Progress()
    result = {**env, "quick": quick, "ns": [], "ns_speedups": [], "ns_algorithms": [], "update": [], "step": [],
              "step_speedups": [], "ceilings": None, "floors": [],
              "notes": [], "budget_minutes": args.budget_minutes, "complete": False, "skipped": []}
    with_phases = device.type == "cuda" if args.phases is None else args.phases
    if with_phases and "step" in args.sections:
        progress("ceilings: bf16 matmul rate and copy bandwidth")
        result["ceilings"] = phases.ceilings(device)
    budget = Budget(args.budget_minutes, clock)
    path = None
    result["errors"] = []
    if emulated:
        result["notes"].append(f"this CPU emulates bf16 (a 512² bf16 matmul took {slowdown:.0f}× an fp32 one): by "
                               "default the step section runs widths ÷8 only and the algorithms section its fp32 "
                               "points (--width-divisor chooses); pass ns_dtype=torch.float32 on such a CPU")
    for section, what in work_plan(device, args.sections, models, quick, widths,
                                   max(args.width_divisor) if args.width_divisor else 1, algorithm_dtypes):
        if budget.spent():
            result["skipped"].append([section, list(what) if isinstance(what, tuple) else what])
            continue
        failed = False
        try:
            _run_item(section, what, result, device, quick, warmup, repeat, progress, with_phases, widths, args.out_dir,
                      compiled=args.budget_minutes is None)
        except Exception as exc:  # an item that fails (out of memory, a backend error) does not end the run
            result["errors"].append([section, list(what) if isinstance(what, tuple) else what, repr(exc)[:500]])
            print(f"\n{section} {what} failed: {exc!r}", file=sys.stderr)
            failed = True
        if failed and device.type == "cuda":  # after the except: its traceback no longer holds the tensors
            try:
                torch.cuda.empty_cache()
            except Exception:  # a sticky CUDA error: the next item reports its own failure
                pass
        path = write_results(result, args.out_dir)  # valid JSON after every item
    result["complete"] = not result["skipped"] and not result["errors"]
    progress.done()
    if result["skipped"]:
        print(f"budget of {args.budget_minutes} min spent: skipped {len(result['skipped'])} items "
              f"(listed under 'skipped' in the JSON)")

    if result["ns"]:
        print("\nNewton–Schulz (5 keller steps, bf16 iteration; TF = effective TFLOP/s, naive FLOPs)")
        print(_ns_table(result["ns"], result["ns_speedups"]))
    if result["ns_algorithms"]:
        print("\nNewton–Schulz algorithms (speed-up vs the same backend's standard NS; errors vs fp64)")
        print(table([[f"{r['shape'][0]}x{r['shape'][1]}", r["dtype"], r["backend"], r["algorithm"], f"{r['ms']:.3g}",
                      f"{r['speedup']:.2f}x", f"{r['flops'] / 1e9:.3g}", f"{r['polar_error']:.3f}",
                      f"{r['recurrence_error']:.2e}"] for r in result["ns_algorithms"]],
                    ["shape", "dtype", "backend", "algorithm", "ms", "speedup", "GFLOP", "polar err", "vs recurrence"]))
    if result["update"]:
        print("\nElementwise half of the step (momentum → stack, decay + update)")
        print(table([[r["model"], r["impl"], f"{r['ms']:.3g}", f"{r['gbps']:.3g}", f"{r['fraction_of_copy']:.2f}"]
                     for r in result["update"]], ["model", "implementation", "ms", "GB/s", "of copy"]))
    if result["step"]:
        ratio = {(s["model"], s["width_divisor"], s["impl"]): s["speedup"] for s in result["step_speedups"]}
        label = lambda r: step.label(r) + (  # noqa: E731
            f" ({r['layers_run']} of {r['layers']} layers, scaled)" if r["layers_run"] < r["layers"] else "")
        print("\nMuon.step() (on a CPU each ratio is to the torch.optim.Muon steps interleaved with it)")
        print(table([[label(r), r["impl"], f"{r['ms']:.2f}",
                      f"{ratio.get((r['model'], r['width_divisor'], r['impl']), 1.0):.2f}x",
                      "-" if r["extra_memory_bytes"] is None else f"{r['extra_memory_bytes'] / 2**20:.0f} MiB"]
                     for r in result["step"]],
                    ["model", "implementation", "ms/step", "speedup vs torch.optim.Muon", "extra memory"]))
    if any("phases" in r for r in result["step"]):
        print("\nWhere the step's time goes (ms; device = kernel time of the phase, host = its host time; "
              "gap = wall − all kernel time)")
        print(_phase_table(result["step"]))
        for f in result["floors"]:
            print(f"floor {step.label(f)}, {f.get('param_dtype', 'fp32')} parameters: {f['floor_ms']:.3g} ms = NS {f['ns_ms_symmetric']:.3g} "
                  f"({f['ns_tflop_symmetric']:.3g} TFLOP with symmetric products; {f['ns_ms_naive']:.3g} naive) + "
                  f"elementwise {f['elementwise_ms']:.3g} ({f['elementwise_gb']:.3g} GB) + AdamW {f['adamw_ms']:.3g} "
                  f"at {result['ceilings']['bf16_mm_tflops']:.3g} TFLOP/s and {result['ceilings']['copy_gbps']:.4g} GB/s "
                  "measured here")
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
