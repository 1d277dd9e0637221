"""The step section's per-phase breakdown and floor (bench/phases.py), on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import phases  # noqa: E402
import step  # noqa: E402
from common import MODELS, layer_shapes  # noqa: E402

import muon_kernels as mk  # noqa: E402
from muon_kernels.bucket import Bucket  # noqa: E402


def test_breakdown_names_every_phase_of_ours_and_torchs_step():
    mats, vecs = step.make_params("gpt2-small", 1, 16, torch.device("cpu"))
    opt = mk.Muon([{"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False}], lr=0.02)
    opt.step()
    ours = phases.breakdown(opt.step, torch.device("cpu"), steps=2)
    names = set(ours["phases"])
    assert {"momentum", "update", "adamw"} <= names
    ns = sorted(n for n in names if n.startswith("ns "))
    # GPT-2's oriented buckets at width 48: 48×144 (c_attn), 48×48 (c_proj), 48×192 (the two MLP matrices)
    assert ns == ["ns 48x144x1 torch:default", "ns 48x192x2 torch:default", "ns 48x48x1 torch:default"]
    assert ours["phases"]["momentum"]["calls"] == 3 and ours["wall_ms"] > 0
    assert all(p["host_ms"] > 0 and p["device_ms"] is None for p in ours["phases"].values())
    # the instrumentation is gone afterwards: the methods are the class's own again
    assert Bucket.momentum_stack.__qualname__ == "Bucket.momentum_stack"

    ref = torch.optim.Muon(mats, lr=0.02)
    adamw = torch.optim.AdamW(vecs)

    def reference():
        ref.step()
        adamw.step()

    reference()
    theirs = phases.breakdown(reference, torch.device("cpu"), steps=2)
    assert theirs["phases"]["ns"]["calls"] == 4 and theirs["phases"]["adamw"]["calls"] == 1


def test_floor_of_gpt2_small_from_its_flops_and_bytes():
    """DESIGN.md §4: GPT-2 small's NS is ~1.5 TFLOP naive; with symmetric products 3m²n + m³ per
    step; the elementwise half moves 6 fp32 values + 1 bf16 per matrix element."""
    matrices, vectors = layer_shapes("gpt2-small")
    layers = MODELS["gpt2-small"]["layers"]
    f = phases.floor(matrices * layers, vectors * layers, 4, {"bf16_mm_tflops": 800.0, "copy_gbps": 4200.0})
    assert f["ns_tflop_naive"] == pytest.approx(1.52, abs=0.01)
    symmetric = layers * 5 * sum(3 * min(s) ** 2 * max(s) + min(s) ** 3 for s in matrices)
    assert f["ns_tflop_symmetric"] == pytest.approx(symmetric / 1e12)
    elements = layers * sum(r * c for r, c in matrices)
    assert f["elementwise_gb"] == pytest.approx(elements * 26 / 1e9)
    assert f["ns_ms_naive"] == pytest.approx(f["ns_tflop_naive"] / 800 * 1e3)
    assert f["floor_ms"] == pytest.approx(f["ns_ms_symmetric"] + f["elementwise_ms"] + f["adamw_ms"])


def test_ceilings_are_measured_positive_rates():
    c = phases.ceilings(torch.device("cpu"), warmup=1, repeat=2)
    assert c["bf16_mm_tflops"] > 0 and c["copy_gbps"] > 0
