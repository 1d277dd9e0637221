"""Regenerate backend="auto"'s measured crossovers from committed GPU benchmark results.

For each GPU model (device name) and each compute capability with a committed bench/results JSON
(the newest per name and per capability, by the date in its name
``<device>-<YYYY-MM-DD>-<commit>.json``), the crossover is the smallest oriented m from which ``ours-triton`` beats ``ours-torch`` (batched
cuBLAS) at every measured shape and batch with that m or larger; it is written to
muon_kernels/backends/crossovers.json, which the dispatcher reads: a GPU's own model first, else
its capability's newest result, else the conservative default. CPU results and convergence curves are ignored.

    python bench/crossovers.py [--results bench/results] [--out muon_kernels/backends/crossovers.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from common import REPO, RESULTS_DIR

OUT = REPO / "muon_kernels" / "backends" / "crossovers.json"
NOTE = ("Measured backend='auto' crossovers per GPU model and per CUDA compute capability (smallest oriented m "
        "from which ours-triton beat ours-torch at every measured point), from the newest committed GPU benchmark "
        "under bench/results/; a GPU takes its model's entry, else its capability's, else the default in "
        "muon_kernels/backends/__init__.py.")
_DATE = re.compile(r"-(\d{4}-\d{2}-\d{2})(?:-|$)")


def stamp(path: Path) -> tuple[str, str]:
    """(date, name) of a result file: the date orders runs of one capability across device names
    (an H100 and an H200 share 9.0, and "nvidia-h100-…" sorts after "h200-…" whatever the dates);
    the name breaks ties. A name without a date sorts first."""
    found = _DATE.search(path.stem)
    return (found.group(1) if found else "", path.name)


def crossover(ns_rows: list[dict]) -> int | None:
    """Smallest m such that ours-triton is faster than ours-torch at every (shape, batch) with m' >= m;
    None when it never wins at the largest measured m."""
    ms: dict[tuple, dict[str, float]] = {}
    for r in ns_rows:
        if r["impl"] in ("ours-triton", "ours-torch"):
            ms.setdefault((tuple(r["shape"]), r["batch"]), {})[r["impl"]] = r["ms"]
    wins = sorted((shape[0], t["ours-triton"] < t["ours-torch"]) for (shape, _), t in ms.items() if len(t) == 2)
    best = None
    for m in sorted({m for m, _ in wins}, reverse=True):
        if all(win for m2, win in wins if m2 >= m):
            best = m
        else:
            break
    return best


def gpu_results(results_dir: Path) -> list[tuple[tuple[str, str], dict, str]]:
    """(stamp, result, file name) of every GPU benchmark result under ``results_dir``, each file
    read once: CPU results (no capability), results without NS rows and convergence curves are left out."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        if path.name.startswith("convergence-"):
            continue
        result = json.loads(path.read_text())
        if result.get("capability") and result.get("ns"):
            found.append((stamp(path), result, path.name))
    return found


def _newest(results: list[tuple[tuple[str, str], dict, str]], key_of) -> dict:
    """The crossover entry of the newest result per ``key_of(result)``."""
    newest: dict[str, tuple[tuple[str, str], dict, str]] = {}
    for when, result, name in results:
        key = key_of(result)
        if key not in newest or when >= newest[key][0]:
            newest[key] = (when, result, name)
    out = {}
    for key, (_, result, name) in sorted(newest.items()):
        m = crossover(result["ns"])
        if m is not None:
            out[key] = {"triton_min_m": m, "device": result["device"], "source": f"bench/results/{name}",
                        "commit": result["commit"]}
    return out


def _capability(result: dict) -> str:
    return "{}.{}".format(*result["capability"])


def _device(result: dict) -> str:
    return result["device"]


def table(results_dir: Path) -> dict:
    """Per compute capability ("9.0"): what a GPU without a result of its own takes."""
    return _newest(gpu_results(results_dir), _capability)


def device_table(results_dir: Path) -> dict:
    """Per device name (torch.cuda.get_device_name): GPUs of one capability differ in memory
    bandwidth and SM count (an H100 and an H200 are both 9.0), so a GPU's own result comes first."""
    return _newest(gpu_results(results_dir), _device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    results = gpu_results(args.results)  # both tables from one read of the results
    by_capability = _newest(results, _capability)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc.update({"generated_by": "bench/crossovers.py", "note": NOTE, "by_device": _newest(results, _device),
                "by_capability": by_capability})
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{args.out}: " + (", ".join(f"sm_{k.replace('.', '')} m >= {v['triton_min_m']}"
                                      for k, v in by_capability.items()) or "no GPU results, defaults kept"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
