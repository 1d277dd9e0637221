"""Cautious weight decay, a kernel backend against the torch backend over whole optimizer steps,
with the mask's discontinuity accounted for.

The cautious mask ``W·O >= 0`` is discontinuous: where an entry of O is within the two backends'
rounding difference of zero, its sign can differ between them, and that entry is decayed by one
and not the other — a difference of lr·wd·|W| (2.5% of |W| here), far above rounding, which a
global relative tolerance either misses or must be loosened for (one such entry out of 786k was
3.6e-5 relative on an H200). So the comparison measures each backend's O sign per step and per
entry, and asserts what must hold:

- where the two masks agree at every step, the parameters agree to ``tol`` (the backends' rounding);
- where they differ, the parameters differ by at most the decay (one factor lr·wd·|W| per step);
- masks differ rarely: only where O's sign is within rounding, a small fraction of entries (a
  kernel with the sign convention wrong would differ on half of them).

O's sign per backend comes from a twin with the same gradients, ``weight_decay=0`` (the same plan
and kernels: the decay is not a plan key) and its parameters zeroed before each step: its update
is then exactly fl(-lr·scale·O), whose sign is O's. Momentum and Newton–Schulz do not depend on W,
and the kernels are deterministic, so the twin's O is the cautious run's O bit for bit.
"""

from __future__ import annotations

import torch

import muon_kernels as mk


def run_pair(backend: str, shapes, dtype: torch.dtype, device, steps: int = 3, lr: float = 0.05,
             wd: float = 0.5, seed: int = 0) -> dict:
    """Cautious runs on ``backend`` and on "torch", plus their zero-start no-decay twins, on the
    same gradients. Returns the final parameters and, per parameter, the entries whose masks
    differed at some step."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    runs = {}
    for name, b, decay in (("kernel", backend, wd), ("torch", "torch", wd),
                           ("kernel_sign", backend, 0.0), ("torch_sign", "torch", 0.0)):
        ps = [torch.nn.Parameter(w.clone()) for w in start]
        runs[name] = (ps, mk.Muon(ps, lr=lr, weight_decay=decay, weight_decay_mode="cautious",
                                  ns_dtype=torch.float32, backend=b))
    flipped = [torch.zeros(s, dtype=torch.bool, device=device) for s in shapes]
    for _ in range(steps):
        grads = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
        w_before = [q.detach().clone() for q in runs["torch"][0]]
        with torch.no_grad():
            for name in ("kernel_sign", "torch_sign"):
                for p in runs[name][0]:
                    p.zero_()
        for ps, opt in runs.values():
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            opt.step()
        for i, w in enumerate(w_before):
            # The update is fl(-lr·scale·O): -sign(update) is sign(O), zero where O is (or underflows).
            o_kernel = -runs["kernel_sign"][0][i].detach()
            o_torch = -runs["torch_sign"][0][i].detach()
            flipped[i] |= mask(w, o_kernel) != mask(w, o_torch)
    return {"kernel": [p.detach() for p in runs["kernel"][0]], "torch": [q.detach() for q in runs["torch"][0]],
            "flipped": flipped, "steps": steps, "lr": lr, "wd": wd}


def mask(w: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Where cautious weight decay applies: W·O >= 0 from the signs, zeros agreeing."""
    return ((w >= 0) == (o >= 0)) | (w == 0) | (o == 0)


def check(result: dict, tol: float, max_flipped_fraction: float = 1e-4) -> int:
    """The three properties of the module docstring; returns how many entries flipped."""
    total_flipped = 0
    for p, q, flipped in zip(result["kernel"], result["torch"], result["flipped"]):
        p, q = p.double(), q.double()
        agree = ~flipped
        assert ((p - q)[agree].norm() / q.norm()).item() <= tol
        gap = (p - q).abs()[flipped]
        decay = result["steps"] * result["lr"] * result["wd"] * torch.maximum(p.abs(), q.abs())[flipped]
        assert (gap <= decay * (1 + 1e-6) + tol * q.abs().max()).all(), (gap, decay)
        assert flipped.sum().item() <= max(1, max_flipped_fraction * flipped.numel()), flipped.sum().item()
        total_flipped += int(flipped.sum().item())
    return total_flipped
