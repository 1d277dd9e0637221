"""Bandwidth of the elementwise half of a Muon step over a whole model's matrices: momentum →
Nesterov → stack before Newton–Schulz, and decoupled decay + lr·scale update after it.

Both halves are memory-bound, so they are reported in GB/s of compulsory traffic and as a fraction
of a device-to-device copy measured in the same run. Per element of an fp32 parameter: the
momentum half reads G and M and writes M and the stacked update (16 B); the update half reads W and
the bf16 O and writes W (10 B). ``torch.optim.Muon`` is torch's per-parameter sequence of the same
operations (lerp_, lerp, mul_, add_), Newton–Schulz excluded from every timing.
"""

from __future__ import annotations

import torch

import muon_kernels as mk
from muon_kernels import momentum_precision, settings
from common import MODELS, each_row, summarize, time_call
from step import LAYER_LIMIT, make_params


def _bytes(mats: list[torch.Tensor]) -> int:
    elems = sum(p.numel() for p in mats)
    p = mats[0].element_size()
    return elems * (4 * p + (2 * p + 2))


def _ours(backend: str, mats):
    opt = mk.Muon(mats, lr=0.02, weight_decay=0.1, backend=backend)
    work = settings.check_grads(opt.param_groups)
    buckets, _ = opt._plan_buckets([w for w in work if w[2]])
    orthos = [torch.randn(b.matrices, b.m, b.n, device=b.device).bfloat16() for b in buckets]

    @torch.no_grad()
    def run():
        for bucket, ortho in zip(buckets, orthos):
            grads = [e.param.grad for e in bucket.entries]
            bufs = [momentum_precision.momentum_buffer(opt.state, e.param, opt.param_groups[e.group])
                    for e in bucket.entries]
            bucket.momentum_stack(grads, bufs, opt.param_groups, opt.state)
            bucket.apply_update(ortho, opt.param_groups, opt.state)
    return run


def _torch_muon(mats):
    bufs = [torch.zeros_like(p) for p in mats]
    outs = [torch.randn(p.shape, device=p.device).bfloat16() for p in mats]
    lr, wd, mu = 0.02, 0.1, 0.95

    @torch.no_grad()
    def run():
        for p, buf, o in zip(mats, bufs, outs):
            buf.lerp_(p.grad, 1 - mu)
            p.grad.lerp(buf, mu)
            p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr * max(1, p.shape[0] / p.shape[1]) ** 0.5)
    return run


def copy_gbps(nbytes: int, device: torch.device, warmup: int, repeat: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = summarize(time_call(lambda: dst.copy_(src), device=device, warmup=warmup, repeat=repeat))["ms"]
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def run(device: torch.device, *, model: str, width_divisor: int, warmup: int, repeat: int, progress,
        on_error=None) -> list[dict]:
    """Rows per implementation; a model over ``step.LAYER_LIMIT`` runs that many layers (a bandwidth
    fraction needs no more; LLaMA-7B's 32 layers with their copy buffers do not fit an 80 GB GPU).
    ``on_error(impl, exc)``: a row that raises is reported there and the next row runs (None: it raises)."""
    layers = min(MODELS[model]["layers"], LAYER_LIMIT.get(model, MODELS[model]["layers"]))
    mats, _ = make_params(model, layers, width_divisor, device)
    nbytes = _bytes(mats)
    copy = copy_gbps(nbytes, device, warmup, repeat)
    impls = [(f"ours-{name}", lambda name=name: _ours(name, mats))
             for name, (ok, _) in mk.available_backends(device).items() if ok]
    impls.append(("torch.optim.Muon", lambda: _torch_muon(mats)))

    def measure(name, build):
        progress(f"update {model} {name}")
        samples = time_call(build(), device=device, warmup=warmup, repeat=repeat)
        stats = summarize(samples)
        gbps = nbytes / (stats["ms"] * 1e-3) / 1e9
        return {"model": model, "width_divisor": width_divisor, "impl": name, **stats, "bytes": nbytes,
                "layers": MODELS[model]["layers"], "layers_run": layers,
                "gbps": gbps, "copy_gbps": copy, "fraction_of_copy": gbps / copy, "samples": samples}

    return list(each_row(impls, measure, device, on_error))
