"""PNG plots of a bench/run.py result (matplotlib, the optional `bench` extra).

- ``<stem>-ns.png``: effective TFLOP/s against matrix size per implementation, one panel per batch
  size, with the measured bf16 ``torch.mm`` peak and the 1.5× symmetric ceiling above it (DESIGN.md
  §3: computing only half of the two symmetric products can at most make the iteration 1.5× the
  GEMM rate in naive-FLOP terms, for square matrices).
- ``<stem>-step.png``: ``Muon.step()`` speedup over torch.optim.Muon per model.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from step import label  # noqa: E402


def _ns(result: dict, path: Path) -> Path | None:
    rows = [r for r in result["ns"] if r["shape"][0] == r["shape"][1]]  # the square sweep
    if not rows:
        return None
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        here = [r for r in rows if r["batch"] == batch]
        sizes = sorted({r["shape"][0] for r in here})
        for impl in dict.fromkeys(r["impl"] for r in here):
            pts = sorted((r["shape"][0], r["tflops"]) for r in here if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl, linewidth=2 if impl.startswith("ours-") else 1)
        peak = {r["shape"][0]: r["mm_peak_tflops"] for r in here}
        ax.plot(sizes, [peak[s] for s in sizes], "k--", label="bf16 torch.mm (measured)")
        ax.plot(sizes, [1.5 * peak[s] for s in sizes], "k:", label="1.5× symmetric ceiling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (n×n matrices)")
        ax.set_title(f"batch {batch}")
    axes[0][0].set_ylabel("effective TFLOP/s (naive FLOPs)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Newton–Schulz, {result['device']}" + (" (CPU smoke run)" if result.get("capability") is None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _step(result: dict, path: Path) -> Path | None:
    speedups = result.get("step_speedups") or []
    if not speedups:
        return None
    models = list(dict.fromkeys(label(s) for s in speedups))
    impls = list(dict.fromkeys(s["impl"] for s in speedups))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(models), 3.6))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = {label(s): s["speedup"] for s in speedups if s["impl"] == impl}
        ax.bar([m + i * width for m in range(len(models))], [vals.get(m, 0) for m in models], width, label=impl)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks([m + width * (len(impls) - 1) / 2 for m in range(len(models))], models)
    ax.set_ylabel("speedup vs torch.optim.Muon")
    ax.set_title(f"Muon.step(), {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw(result: dict, stem: Path) -> list[Path]:
    stem = Path(stem)
    drawn = [_ns(result, stem.with_name(stem.name + "-ns.png")), _step(result, stem.with_name(stem.name + "-step.png"))]
    return [p for p in drawn if p is not None]
