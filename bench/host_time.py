"""Host time of a Triton-backend `Muon.step()`, measured on a CPU: the Python and torch work the step
does around its kernel launches, with the launches themselves stubbed out.

On a GPU a step's kernels run asynchronously, so a step is host-bound wherever the host takes longer
to enqueue a launch than the GPU takes to run it — GPT-2 small's 768-wide NS products run for tens of
µs each. This measures the part of that host time that is ours (launchers, tables, allocations,
dispatch), without a GPU: under ``TRITON_INTERPRET=1`` the Triton backend runs on CPU tensors, and
with the interpreter's ``run`` replaced by a no-op every launcher executes up to the launch and no
further. Triton's own launch path on a GPU (argument binding, cache lookup, the driver call) is not
included: it adds its own µs per launch.

    TRITON_INTERPRET=1 python bench/host_time.py [--model gpt2-small] [--layers 12] [--steps 20]
                                                 [--variant default|normuon-hyperball|int8-momentum]

Prints ms of host time per step (best of 5 runs of 20 steps), the Triton launches per step, and the
host µs per launch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import layer_shapes


# The step rows of bench/step.py whose host path differs from the default one.
VARIANTS = {
    "default": {},
    "normuon-hyperball": {"adaptive": "normuon", "constraint": "hyperball", "weight_decay": 0.0},
    "int8-momentum": {"momentum_dtype": "int8", "momentum_rounding": "stochastic"},
}


def measure(model: str, layers: int, steps: int, width_divisor: int = 1, variant: str = "default") -> dict:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("host_time.py needs TRITON_INTERPRET=1 in the environment (set before triton loads)")
    from triton.runtime.interpreter import InterpretedFunction

    import muon_kernels as mk

    launches = []
    real_run = InterpretedFunction.run
    InterpretedFunction.run = lambda fn, *args, **kwargs: launches.append(fn.fn.__name__)
    try:
        shapes, _ = layer_shapes(model, width_divisor)
        params = [torch.nn.Parameter(torch.ones(s)) for _ in range(layers) for s in shapes]  # hyperball: norm > 0
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = mk.Muon(params, lr=0.02, backend="triton", dispatch="table", **VARIANTS[variant])
        for _ in range(3):  # tables, plans and caches are built by the first steps
            opt.step()
        best = float("inf")
        for _ in range(5):
            launches.clear()
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            best = min(best, (time.perf_counter() - start) / steps)
    finally:
        InterpretedFunction.run = real_run
    per_step = len(launches) // steps
    return {"model": model, "layers": layers, "width_divisor": width_divisor, "variant": variant,
            "host_ms_per_step": best * 1e3,
            "triton_launches_per_step": per_step, "host_us_per_launch": best * 1e6 / max(per_step, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width-divisor", type=int, default=1)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = measure(args.model, args.layers, args.steps, args.width_divisor, args.variant)
    print(f"{r['model']} {r['variant']} ({r['layers']} layers, width ÷{r['width_divisor']}): "
          f"{r['host_ms_per_step']:.3f} ms of host time per step, {r['triton_launches_per_step']} Triton launches, "
          f"{r['host_us_per_launch']:.1f} µs per launch")


if __name__ == "__main__":
    main()
