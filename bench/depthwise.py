"""Depthwise convolutions under Muon or AdamW: a tiny ConvNeXt (transformers) on scikit-learn's
bundled digits, 3 seeds, equal steps, everything else routed by param_groups (docs/param_groups.md).

    python bench/depthwise.py [--steps 150] [--seeds 3]

A depthwise filter (C, 1, k, k) is C independent k×k filters; flattened into one C × k² matrix,
Newton–Schulz would couple channels that never interact. This measures what that does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import transformers
from sklearn.datasets import load_digits

import muon_kernels as mk


def _data():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8).repeat(1, 3, 1, 1) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def run(depthwise_to: str, seed: int, steps: int) -> dict:
    torch.manual_seed(seed)
    config = transformers.ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[32, 64],
                                         depths=[2, 2], num_labels=10, image_size=8)
    model = transformers.ConvNextForImageClassification(config)
    groups = mk.param_groups(model, head="classifier")
    if depthwise_to == "muon":  # move the depthwise filters into a flatten Muon group
        moved = []
        for g in groups:
            if g["use_muon"]:
                continue
            depthwise = [(n, p) for n, p in g["params"] if g["param_reasons"][n].startswith("depthwise")]
            moved += depthwise
            g["params"] = [(n, p) for n, p in g["params"] if all(n != m for m, _ in depthwise)]
        groups.insert(0, {"params": moved, "use_muon": True, "matrix_view": "flatten",
                          "param_reasons": {n: "depthwise conv (moved to Muon)" for n, _ in moved}})
    opt = mk.Muon(groups, lr=0.02, adamw_lr=3e-3, ns_dtype=torch.float32)
    (xt, yt), (xv, yv) = _data()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(yt), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=xt[idx]).logits, yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=xv).logits
    return {"train_loss_last20": statistics.mean(losses[-20:]),
            "test_loss": torch.nn.functional.cross_entropy(logits, yv).item(),
            "test_accuracy": (logits.argmax(-1) == yv).float().mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for where in ("adamw", "muon"):
        runs = [run(where, seed, args.steps) for seed in range(args.seeds)]
        results[where] = {k: (statistics.mean(r[k] for r in runs), statistics.stdev(r[k] for r in runs)) for k in runs[0]}
        print(where, {k: f"{m:.4f} ± {s:.4f}" for k, (m, s) in results[where].items()}, flush=True)
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
