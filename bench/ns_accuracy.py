"""The accuracy measurements behind the Newton–Schulz defaults (docs/newton_schulz.md), reproducible:

1. Gram restarts: relative Frobenius error of Gram NS against the fp64 standard recurrence, per
   spectrum (Gaussian, condition 1e6, rank-deficient, one dominant direction), coefficient set,
   iteration dtype and restart schedule, beside standard NS's own error at that dtype.
2. AOL coefficients: distance to the fp64 SVD polar factor and the singular-value range after
   AOL + 4 steps for the candidate coefficient sets, beside standard 5-step NS.
3. Gram accuracy by preset: per preset (its own steps and normalization) and 16-bit dtype, Gram NS
   with the default restarts and with one restart (before step 2) over 4 shapes × 3 seeds × 4
   spectra, each error divided by DESIGN.md §5's band at that input (2 × standard NS's own error at
   the dtype + 1e-2): the worst ratio and where, and how many inputs exceed the band.

    python bench/ns_accuracy.py [--out bench/results/cpu/ns_accuracy.json] [--quick]

--quick leaves the largest preset shape (256×1024) out of table 3: four fifths of the CPU time
(16-bit GEMMs are emulated on CPUs without bf16 instructions); make test runs it that way and checks
the committed full table separately.

Everything runs on the CPU through the torch backend's products (muon_kernels.recurrence), so the
numbers are those of the code that ships. m = 128 keeps fp16 (slow CPU GEMMs) to seconds.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from muon_kernels import recurrence
from muon_kernels.backends.torch_backend import MATMUL_OPS, normalize
from muon_kernels.ns_config import POLAR_EXPRESS, TURBO, resolve_ns_config

OUT = Path(__file__).resolve().parent / "results" / "cpu" / "ns_accuracy.json"
RESTARTS = [(), (2,), (1, 3), (2, 4), (5,)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def spectra(m: int, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def with_sigma(sigma):
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
        return U @ torch.diag(sigma) @ V.T

    return {
        "gaussian": torch.randn(m, n, generator=g, dtype=torch.float64),
        "condition 1e6": with_sigma(torch.logspace(0, -6, m, dtype=torch.float64)),
        "rank m/4": with_sigma(torch.cat([torch.ones(m // 4), torch.zeros(m - m // 4)]).double()),
        "one dominant": with_sigma(torch.tensor([1.0] + [1e-3] * (m - 1), dtype=torch.float64)),
    }


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    err = float((x.double() - ref).norm() / ref.norm())
    return err if err == err else float("inf")  # NaN (a blown-up iteration) reads as infinite error


def restart_table(m: int = 128, n: int = 512) -> list[dict]:
    rows = []
    for name, G in spectra(m, n).items():
        for preset, steps in (("keller", 5), ("polar_express", 5), ("keller", 8)):
            exact = resolve_ns_config(preset, steps, 1e-7)
            X64 = normalize(G[None], exact, torch.float64)
            ref = recurrence.standard(X64, exact.coefficients, MATMUL_OPS)
            for dtype_name, dtype in DTYPES.items():
                X = normalize(G[None].float(), exact, dtype)
                row = {"spectrum": name, "coefficients": preset, "steps": steps, "dtype": dtype_name,
                       "standard": _rel(recurrence.standard(X, exact.coefficients, MATMUL_OPS), ref),
                       "gram": {}}
                for restarts in RESTARTS:
                    if restarts and restarts[-1] >= steps:
                        continue
                    out = recurrence.gram(X, exact.coefficients, restarts, MATMUL_OPS)
                    row["gram"][str(list(restarts))] = _rel(out, ref)
                row["gram"]["default " + str(list(exact.gram_restarts(dtype)))] = _rel(
                    recurrence.gram(X, exact.coefficients, exact.gram_restarts(dtype), MATMUL_OPS), ref)
                rows.append(row)
    return rows


AOL_CANDIDATES = {
    "standard keller, 5 steps": (resolve_ns_config("keller", 5, 1e-7), "frobenius"),
    "standard polar_express, 5 steps": (resolve_ns_config("polar_express", 5, 1e-7), "frobenius"),
    "standard keller, 4 steps": (resolve_ns_config("keller", 4, 1e-7), "frobenius"),
    "AOL + turbo (flash-newton-schulz), 4 steps": (resolve_ns_config(list(TURBO), 4, 1e-7), "aol"),
    "AOL + polar_express steps 2-5, 4 steps": (resolve_ns_config(list(POLAR_EXPRESS[1:]), 4, 1e-7), "aol"),
    "AOL + keller, 4 steps": (resolve_ns_config("keller", 4, 1e-7), "aol"),
}


def aol_table(m: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    inputs = {"gaussian square": torch.randn(m, m, generator=g, dtype=torch.float64),
              "gaussian 1:4": torch.randn(m, 4 * m, generator=g, dtype=torch.float64)}
    for name, G in spectra(m, m, seed=3).items():
        if name in ("condition 1e6", "rank m/4"):
            continue
        inputs[name + " square"] = G
    for cond in (1e-2, 1e-3):
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        inputs[f"condition {1 / cond:g} square"] = U @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(),
                                                                                m, dtype=torch.float64)) @ V.T
    rows = []
    for name, G in inputs.items():
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        for label, (config, normalization) in AOL_CANDIDATES.items():
            config = replace(config, normalization=normalization)
            for dtype_name in ("float32", "bfloat16"):
                dtype = DTYPES[dtype_name]
                out = recurrence.run(normalize(G[None].float(), config, dtype), config, dtype, MATMUL_OPS)[0].double()
                s = torch.linalg.svdvals(out)
                rows.append({"input": name, "method": label, "dtype": dtype_name, "polar_error": _rel(out, polar),
                             "sigma_min": float(s.min()), "sigma_max": float(s.max())})
    return rows


PRESET_SHAPES = [(64, 128), (64, 256), (128, 512), (256, 1024)]


def preset_table(shapes=PRESET_SHAPES, seeds=(1, 2, 3)) -> list[dict]:
    rows = []
    for preset in ("keller", "quintic", "polar_express", "turbo"):
        config = resolve_ns_config(preset, None, 1e-7)
        for dtype_name in ("bfloat16", "float16"):
            dtype = DTYPES[dtype_name]
            schedules = {"default": config.gram_restarts(dtype), "one restart, before step 2": (2,)}
            ratios: dict[str, list] = {label: [] for label in schedules}
            for m, n in shapes:
                for seed in seeds:
                    for name, G in spectra(m, n, seed).items():
                        ref = recurrence.run(normalize(G[None], config, torch.float64), config, torch.float64,
                                             MATMUL_OPS)
                        X = normalize(G[None].float(), config, dtype)
                        band = 2 * _rel(recurrence.run(X, config, dtype, MATMUL_OPS), ref) + 1e-2
                        for label, restarts in schedules.items():
                            gram = replace(config, algorithm="gram", restarts=restarts)
                            ratios[label].append((_rel(recurrence.run(X, gram, dtype, MATMUL_OPS), ref) / band,
                                                  f"{m}×{n} seed {seed} {name}"))
            for label, values in ratios.items():
                worst = max(values)
                rows.append({"preset": preset, "dtype": dtype_name, "restarts": label,
                             "schedule": list(schedules[label]), "inputs": len(values),
                             "over_band": sum(v > 1 for v, _ in values), "worst_ratio": worst[0],
                             "worst_input": worst[1]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="table 3 without its largest shape")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    restarts = restart_table()
    print("Gram restarts: error vs the fp64 recurrence (standard NS's own error first)")
    for r in restarts:
        cells = " ".join(f"{k} {v:.1e}" for k, v in r["gram"].items())
        print(f"{r['spectrum']:14s} {r['coefficients']:13s} {r['steps']} {r['dtype']:8s} standard {r['standard']:.1e} | {cells}")
    aol = aol_table()
    print("\nAOL: distance to the polar factor [σ min, σ max]")
    for r in aol:
        print(f"{r['input']:24s} {r['dtype']:8s} {r['method']:44s} {r['polar_error']:.3f} "
              f"[{r['sigma_min']:.2f}, {r['sigma_max']:.2f}]")
    presets = preset_table(PRESET_SHAPES[:-1] if args.quick else PRESET_SHAPES)
    print("\nGram accuracy by preset: worst error / band (DESIGN.md §5), inputs over the band")
    for r in presets:
        print(f"{r['preset']:13s} {r['dtype']:8s} {r['restarts']:26s} {r['worst_ratio']:.3f} ({r['worst_input']}) "
              f"{r['over_band']}/{r['inputs']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"restarts": restarts, "aol": aol, "presets": presets}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
