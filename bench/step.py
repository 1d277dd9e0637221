"""Full optimizer step: muon_kernels.Muon (every backend that can run here) vs torch.optim.Muon + AdamW.

All implementations step the same parameters with the same gradients in one process, so the
speedup is a side-by-side ratio. On a GPU the shapes are the real model's; on a CPU this is a
smoke run (labelled ``quick``): the width is divided by 8 and the CPU's slow bf16 GEMM is shown
beside an fp32 iteration. Run through bench/run.py.
"""

from __future__ import annotations

import torch

import muon_kernels as mk
from common import MODELS, each_row, layer_shapes, summarize, through_triton_dispatch, time_call
from phases import breakdown


def make_params(model: str, layers: int, width_divisor: int, device: torch.device, seed: int = 0,
                dtype: torch.dtype = torch.float32):
    """Parameters and gradients drawn on ``device`` itself (LLaMA-1B's 2.1 G numbers took 7–10 s per
    row from the CPU generator and a host copy): the same values for every row on one device; in
    ``dtype`` (the fp32 draws, rounded), gradients too."""
    g = torch.Generator(device=device).manual_seed(seed)
    matrices, vectors = layer_shapes(model, width_divisor)
    mats, vecs = [], []
    for _ in range(layers):
        mats += [torch.nn.Parameter((torch.randn(s, generator=g, device=device) / s[1] ** 0.5).to(dtype))
                 for s in matrices]
        vecs += [torch.nn.Parameter(torch.zeros(n, device=device, dtype=dtype)) for n in vectors]
    for p in mats + vecs:
        p.grad = torch.randn(p.shape, generator=g, device=device).to(dtype)
    return mats, vecs


# Rows whose name ends so step bf16 parameters (and gradients), against the reference row of the
# same name; every other row steps fp32 parameters. Issue 26's targets name both for the GPT-2 models
# (BF16_PARAM_MODELS); LLaMA-1B's rows take 13–15 s each on an H200, so its budget keeps fp32 only.
BF16_PARAMS = "-bf16-params"
BF16_PARAM_MODELS = ("gpt2-small", "gpt2-medium")


def param_dtype(impl: str) -> str:
    """The parameter dtype a step row's implementation steps: "bf16" or "fp32"."""
    return "bf16" if impl.endswith(BF16_PARAMS) else "fp32"


# The rows a short GPU session must bring back first for each model (bench/run.py runs them as one
# work item, the rest of the model's rows as a later one): the reference, what a user gets (and the
# same with the step replayed as a CUDA graph), the Triton backend alone, then the reference and
# what a user gets again with bf16 parameters (last: a run cut inside the group loses them first).
DEFAULT_IMPLS = ("torch.optim.Muon", "ours-auto", "ours-auto-graph", "ours-triton",
                 "torch.optim.Muon" + BF16_PARAMS, "ours-auto" + BF16_PARAMS)
GROUPS = ("default", "rest")


def implementations(device: torch.device, quick: bool, width_divisor: int = 1, group: str | None = None,
                    model: str | None = None):
    """(name, build(mats, vecs) -> step callable) for everything that can run on ``device``. A CPU
    at full width runs only the default and the NS-precision/algorithm rows (a step takes seconds
    there; the variant rows' cost shows at ÷8 and ÷4). ``group``: None for every row, "default" for
    ``DEFAULT_IMPLS`` (in that order), "rest" for the others. ``model``: the bf16-parameter rows only
    for BF16_PARAM_MODELS (every model's when None)."""
    if group not in (None, *GROUPS):
        raise ValueError(f"group must be None or one of {GROUPS}, got {group!r}")

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
            if device.type == "cpu" and width_divisor == 1:
                continue
            # Variants on, so their cost is visible per backend: cautious weight decay (one fused
            # branch); NorMuon + hyperball (one statistics pass, factors in the fused update); int8 momentum.
            impls.append((f"ours-{name}-cautious", ours(name, weight_decay_mode="cautious")))
            impls.append((f"ours-{name}-normuon-hyperball",
                          ours(name, adaptive="normuon", constraint="hyperball", weight_decay=0.0)))
            # int8 momentum with stochastic rounding: the low-precision path of the momentum kernel
            impls.append((f"ours-{name}-int8-momentum",
                          ours(name, momentum_dtype="int8", momentum_rounding="stochastic")))
    if device.type == "cuda":
        # what a user gets: the measured choice per bucket (timed in the warm-up steps), momentum and
        # update on the fused kernels, AdamW on a side stream
        impls.append(("ours-auto", ours("auto")))
        # the same, the step's kernels replayed as one CUDA graph (static gradients: set once)
        impls.append(("ours-auto-graph", ours("auto", cuda_graph=True)))
        # AdamW on the main stream, to see what the side stream gains
        impls.append(("ours-auto-serial-adamw", ours("auto", overlap_adamw=False)))
        impls.append(("ours-auto-table", ours("auto", dispatch="table")))  # the static dispatch table
        if mk.available_backends(device)["triton"][0]:
            # the same launches through Triton's per-call dispatch: what direct launches and replayed calls
            # save together (replay needs direct launches)
            # (triton_kernels/launch.py; bench/README.md "Host time of a launch")
            impls.append(("ours-auto-triton-dispatch", _triton_dispatch(ours("auto"))))
        # ns_algorithm="auto": Gram NS where measured faster (or above the table's aspect ratio)
        impls.append(("ours-auto-gram", ours("auto", ns_algorithm="auto")))
        if model is None or model in BF16_PARAM_MODELS:
            # bf16 parameters and gradients (momentum in bf16 on both sides: each keeps the parameter's dtype)
            impls.append(("torch.optim.Muon" + BF16_PARAMS, reference))
            impls.append(("ours-auto" + BF16_PARAMS, ours("auto")))
    if device.type == "cpu":
        impls.append(("ours-torch-gram", ours("torch", ns_algorithm="auto")))
        impls.append(("ours-torch-fp32", ours("torch", ns_dtype=torch.float32)))
        impls.append(("ours-torch-fp32-gram", ours("torch", ns_dtype=torch.float32, ns_algorithm="auto")))
    if group == "default":
        by_name = dict(impls)
        return [(name, by_name[name]) for name in DEFAULT_IMPLS if name in by_name]
    if group == "rest":
        return [(name, build) for name, build in impls if name not in DEFAULT_IMPLS]
    return impls


def _triton_dispatch(build):
    """``build`` with every Triton launch of its steps made through ``kernel[grid]``."""
    def dispatched_build(mats, vecs):
        step = build(mats, vecs)
        return lambda: through_triton_dispatch(step)
    return dispatched_build


# LLaMA-7B does not fit three fp32 copies of itself beside torch.optim.Muon's on one 80 GB GPU: it
# runs on a subset of its layers and the time is scaled by layers / layers run (stated in the row).
LAYER_LIMIT = {"llama-7b": 4}
# A CPU at full width runs LLaMA's shape set on one layer (a step of 16 would take minutes); the
# time is scaled the same way and the row says so.
CPU_FULL_WIDTH_LAYER_LIMIT = {"llama-1b": 1, "llama-7b": 1}


def run(device: torch.device, *, models: list[str], width_divisor: int, quick: bool, warmup: int, repeat: int,
        progress, group: str | None = None, phases: bool | None = None, on_row=None, on_error=None) -> list[dict]:
    """Rows for ``models``; ``group`` (GPU only) restricts them as ``implementations`` does. A CPU
    run pairs every row with its own reference twin, so it always takes every row at once.
    ``phases`` (default: on a GPU) adds each row's per-phase breakdown (bench/phases.py).
    ``on_row(row)`` is called as each row is done (a budgeted run writes it at once: a LLaMA-1B
    group of rows takes minutes, and a run stopped inside it would lose them all). ``on_error(impl,
    exc)``: a row that raises is reported there and the next row runs (None: it raises)."""
    phases = device.type == "cuda" if phases is None else phases
    if group is not None and device.type == "cpu":
        raise ValueError("the CPU step section interleaves every row with its reference: run it with group=None")
    results = []
    for model in models:
        layers = MODELS[model]["layers"]
        run_layers = min(layers, LAYER_LIMIT.get(model, layers))
        if device.type == "cpu" and width_divisor == 1:
            run_layers = min(run_layers, CPU_FULL_WIDTH_LAYER_LIMIT.get(model, layers))
        measure = _interleaved if device.type == "cpu" else _one_by_one
        scale = layers / run_layers
        for row in measure(device, model, run_layers, width_divisor, quick, warmup, repeat, progress, group, phases,
                           on_error):
            stats = {k: v * scale for k, v in summarize(row["samples"]).items()}
            if "phases" in row:
                row["phases"] = _scaled(row["phases"], scale)
            if "paired_reference_samples" in row:
                row["paired_reference_ms"] = summarize(row["paired_reference_samples"])["ms"] * scale
            results.append({"model": model, **row, "width_divisor": width_divisor, "layers": layers,
                            "layers_run": run_layers, **stats})
            if on_row is not None:
                on_row(results[-1])
    return results


def _scaled(breakdown: dict, scale: float) -> dict:
    """A phase breakdown of ``layers_run`` layers, scaled to the model's (every time is per layer)."""
    out = {k: v * scale if k.endswith("_ms") else v for k, v in breakdown.items()}
    out["phases"] = {name: {k: v * scale if k.endswith("_ms") and v is not None else v for k, v in p.items()}
                     for name, p in breakdown["phases"].items()}
    return out


def _one_by_one(device, model, run_layers, width_divisor, quick, warmup, repeat, progress, group=None, phases=False,
                on_error=None):
    """GPU: each implementation on its own parameters, timed with CUDA events, its peak memory, and
    with ``phases`` its per-phase breakdown; a row that raises goes to ``on_error``."""
    def measure(name, build):
        progress(f"step {model} {name}")
        return _timed_row(device, name, build, model, run_layers, width_divisor, warmup, repeat, phases)

    yield from each_row(implementations(device, quick, width_divisor, group, model), measure, device, on_error)


def _timed_row(device, name, build, model, run_layers, width_divisor, warmup, repeat, phases) -> dict:
    """One GPU row (``_one_by_one``); its parameters and optimizer are freed when it returns."""
    mats, vecs = make_params(model, run_layers, width_divisor, device,
                             dtype=torch.bfloat16 if param_dtype(name) == "bf16" else torch.float32)
    step = build(mats, vecs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    first_steps = torch.cuda.max_memory_allocated() - base
    # The steady state's peak: optimizer state (allocated by now) and each step's transients, not
    # the first step's one-off work (the measured dispatch's trial runs, compilation).
    torch.cuda.reset_peak_memory_stats()
    samples = time_call(step, device=device, warmup=0, repeat=repeat)
    row = {"impl": name, "samples": samples, "extra_memory_bytes": torch.cuda.max_memory_allocated() - base,
           "first_steps_extra_memory_bytes": first_steps}
    opt = getattr(step, "__self__", None)  # ours: the optimizer (the reference rows are plain functions)
    graph = getattr(opt, "_graph", None)
    if graph is not None:  # a graph row that could not capture is eager steps: say so in the row
        row["graph_captures"], row["graph_failed"] = graph.captures, graph.failed
        # A captured graph keeps its transients in its private pool (reserved, not allocated, while
        # it replays): what it holds is its capture's peak, in the warm-up steps.
        row["extra_memory_bytes"] = max(row["extra_memory_bytes"], first_steps)
    if isinstance(opt, mk.Muon):  # what each bucket ran: an "auto" row's measured choice (a graph row's may differ)
        row["plan"] = [{"shape": [b.m, b.n], "matrices": b.matrices, "backend": b.backend.NAME, "path": b.path,
                        "why": b.why} for b in opt._buckets]
    if phases:
        row["phases"] = breakdown(step, device)
    return row


def _interleaved(device, model, run_layers, width_divisor, quick, warmup, repeat, progress, group=None, phases=False,
                 on_error=None):
    """CPU: wall clock drifts with the machine's load and clock, so every implementation is timed
    alternating step by step with its own torch.optim.Muon + AdamW twin; its ratio comes from those
    paired samples (``paired_reference_ms``), and the reference row pools every pairing (a row that
    raises goes to ``on_error``, its pairing left out)."""
    (ref_name, ref_build), *others = implementations(device, quick, width_divisor)
    pooled, reference_phases = [], None
    where = label({"model": model, "width_divisor": width_divisor})

    def measure(name, build):
        nonlocal reference_phases
        progress(f"step {where} {name} (interleaved with {ref_name})")
        steps = [ref_build(*make_params(model, run_layers, width_divisor, device)),
                 build(*make_params(model, run_layers, width_divisor, device))]
        for step in steps:
            time_call(step, device=device, warmup=warmup, repeat=0)
        samples = ([], [])
        for _ in range(repeat):
            for step, out in zip(steps, samples):
                out += time_call(step, device=device, warmup=0, repeat=1)
        row = {"impl": name, "samples": samples[1], "paired_reference_samples": samples[0], "extra_memory_bytes": None}
        if phases:
            row["phases"] = breakdown(steps[1], device)
            reference_phases = reference_phases or breakdown(steps[0], device)
        pooled.extend(samples[0])
        return row

    rows = list(each_row(others, measure, device, on_error))
    if not pooled:  # every row failed: no reference samples either
        return []
    reference = {"impl": ref_name, "samples": pooled, "extra_memory_bytes": None}
    return [{**reference, "phases": reference_phases} if phases else reference, *rows]


def speedups(results: list[dict]) -> list[dict]:
    """Each implementation's ratio to torch.optim.Muon at the same model, width and parameter dtype:
    against its own interleaved twin where it has one (CPU), else against that model's reference row
    (``torch.optim.Muon-bf16-params`` for a bf16-parameter row)."""
    key = lambda r: (r["model"], r.get("width_divisor", 1), param_dtype(r["impl"]))  # noqa: E731
    references = ("torch.optim.Muon", "torch.optim.Muon" + BF16_PARAMS)
    ref = {key(r): r["ms"] for r in results if r["impl"] in references}
    return [{"model": r["model"], "width_divisor": r.get("width_divisor", 1), "impl": r["impl"],
             "speedup": r.get("paired_reference_ms", ref.get(key(r))) / r["ms"]}
            for r in results if r["impl"] not in references and ("paired_reference_ms" in r or key(r) in ref)]


def label(row: dict) -> str:
    """A row's model, with its width divisor when not 1."""
    return row["model"] + (f"/width÷{row['width_divisor']}" if row.get("width_divisor", 1) > 1 else "")
