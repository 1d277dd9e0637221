"""Time the Triton Newton–Schulz kernels' variants against each other and the references, in one GPU call.

    python bench/tune.py --out DIR [--budget-minutes 4.5]      # on a GPU (make tune OUT=DIR)
    python bench/tune.py --out DIR --smoke                     # CPU: the harness under the interpreter

Per shape (priority order: the shapes we lose at first, bench/README.md "Kernel notes (Hopper)"):
- ``ns`` rows: the whole 5-step keller recurrence — ours with the table's configs (``ours``;
  ``ours-triton-dispatch``, the same launches through Triton's per-call dispatch instead of direct
  launches; ``ours-replayed``, the call recorded once and replayed (triton_kernels/replay.py; the
  timed runs replay, the fp64 check runs under the debug fill, which turns replay off);
  ``ours-backend``, the optimizer's own path choice, one-kernel for small matrices; ``ours-cublas``,
  the normalization kernels with cuBLAS's GEMMs; ``ours-symmetric-cublas``, the symmetric products
  with cuBLAS's a·X + B·X; ``cuda``, ``cuda-sm75`` and ``cuda-cublas``, the
  CUDA extension's paths where it runs), ours with each
  candidate config forced on every product (config.forced), ours Gram NS (bf16 and fp16, default
  restarts, and fp16 with one restart), torch.optim.Muon's NS routine (one matrix at a time) and
  the plain cuBLAS recurrence. Each is checked against the fp64 recurrence on the same input
  (DESIGN.md §5: 16-bit ≤ 2 × the plain bf16 recurrence's error + 1e-2; fp32 ≤ 1e-4), with every
  kernel work buffer NaN-poisoned for that run (a missed element fails), and run twice to check
  that the bits repeat.
- ``product`` rows: one product alone — X·Xᵀ (m×m×n), b·A + c·A·A (m×m×m) and a·X + B·X (m×n×m) —
  per candidate config, split factor (auto, 1, 2, 3, 4, 6, 8) and persistent on/off, with the
  split model's prediction beside the measurement (so the model's constants can be refit on a CPU).
  ``tflops`` counts naive FLOPs everywhere (a symmetric product executes about half of them).
  ``product-cublas`` rows: the same three products on cuBLAS's batched GEMM (``bmm``/``baddbmm``),
  the reference each kernel is judged against (and what the "symmetric-cublas" path uses for a·X + B·X).

Timing: medians of CUDA-event timings with the L2 flushed and waited for before each repetition
(bench/common.time_call: ``triton.testing.do_bench`` queues its start event behind the flush, so a
host-bound call read as its host time minus the flush's ~60–90 µs), and, for ``ns`` rows,
``do_bench_cudagraph`` medians too (no flush: replays with a warm L2), so ``ms − ms_graph`` is the
host launch overhead plus the cold-L2 cost; and ``host_us``, the host's time to enqueue one call
(5 calls, no sync between them), so a row whose ``host_us`` exceeds its ``ms`` is host-bound.
``ours-replayed`` rows say whether the call was recorded (``recorded``): one that cannot be
recorded times the plain path.
Everything goes into ONE JSON, ``DIR/tune-<device>-<date>.json``, rewritten after every item so it
stays valid when ``--budget-minutes`` stops the run (``complete: false``, ``skipped: [...]``).
``winners`` holds, per (arch, dtype, kind, shape class), the fastest product config where it beat
the table by more than the noise margin, in the form triton_kernels/config.py reads
(``MUON_KERNELS_TUNED_CONFIGS=that.json``, or paste the printed ``TUNED`` rows into config.py).
A short table is printed last. Nothing here is a measurement when run with ``--smoke``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# The interpreter must be on before triton is imported (DESIGN.md §5).
if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from muon_kernels import recurrence  # noqa: E402
from muon_kernels.backends import available_backends, select_backend, triton_backend  # noqa: E402
from muon_kernels.ns_config import resolve_ns_config  # noqa: E402
from muon_kernels.triton_kernels import config as kcfg  # noqa: E402
from muon_kernels.triton_kernels import replay  # noqa: E402
from muon_kernels.triton_kernels.newton_schulz import newton_schulz, ns_update  # noqa: E402
from muon_kernels.triton_kernels.symmetric_matmul import launch_shape, symmetric_matmul  # noqa: E402
from muon_kernels.workspace import FILL_VARIABLE  # noqa: E402
from common import git_commit, through_triton_dispatch, time_call, with_environment  # noqa: E402
from newton_schulz import COEFFICIENTS, STEPS, flush_l2, naive_flops, plain_recurrence, torch_muon_routine  # noqa: E402

SCHEMA = 1
# (m, n, batch), oriented m <= n, in priority order: where we lose first (the H200 table).
SHAPES = [(1024, 4096, 1), (768, 3072, 1), (4096, 4096, 1), (768, 768, 48), (2048, 8192, 1), (512, 512, 64),
          (128, 128, 512), (8192, 8192, 1),
          # GPT-2 small buckets (12 layers): attention in/out, MLP; LLaMA-1B (16 layers): attention, MLP.
          (768, 2304, 12), (768, 3072, 24), (2048, 2048, 64), (2048, 8192, 48)]
SMOKE_SHAPES = [(40, 96, 1)]
FIRST_SHAPES = 4  # SHAPES' head whose product sweeps run right after their recurrence rows
SPLITS = (0, 1, 2, 3, 4, 6, 8)  # 0: the split model's own choice
NOISE = 0.03  # a winner must beat the table by more than this fraction (the spread of two equal runs)


def _ns_config(algorithm: str = "standard", restarts=None):
    return resolve_ns_config(COEFFICIENTS, STEPS, 1e-7, algorithm, ns_gram_restarts=restarts)


def product_flops(product: str, m: int, n: int, batch: int) -> float:
    return batch * {"gram": 2 * m * m * n, "poly": 2 * m**3, "update": 2 * m * m * n}[product]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


# Eager timing on a GPU: repetitions for about TIMED_MS of device time, within REPEATS.
TIMED_MS = 40.0
REPEATS = (5, 100)


class Timer:
    """Medians in ms: flushed CUDA-event timings and do_bench_cudagraph on a GPU, wall clock (a smoke
    value) on a CPU."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.smoke = smoke
        self.flush = flush_l2(device)

    def eager(self, fn) -> float:
        if self.cuda:
            # Two warm-up calls, one flushed timing to size the run, then the timed repetitions.
            estimate = time_call(fn, device=self.device, warmup=2, repeat=1, before=self.flush)[0]
            repeat = min(REPEATS[1], max(REPEATS[0], int(TIMED_MS / max(estimate, 1e-3))))
            return float(statistics.median(time_call(fn, device=self.device, warmup=0, repeat=repeat,
                                                     before=self.flush)))
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def host(self, fn, calls: int = 5) -> float:
        """µs of host time per call: the time to enqueue ``calls`` calls with no sync between them,
        the GPU running behind (on a CPU, the call itself). A call of more than ~200 launches (the
        per-matrix torch.optim.Muon loop at a batch of 48) fills the launch queue and waits on the
        GPU, so for those rows it reads the GPU's pace instead."""
        calls = 1 if self.smoke else calls
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if self.cuda:
            torch.cuda.synchronize()
        return elapsed / calls * 1e6

    def graph(self, fn) -> float | None:
        if not self.cuda:
            return None
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=40, return_mode="median"))


def ceilings(device: torch.device, timer: Timer) -> dict:
    """The two ceilings of METHOD.md, measured here: a bf16 8192² GEMM and a 2 GiB device copy."""
    if device.type != "cuda":
        return {"mm_bf16_tflops": None, "copy_tb_s": None, "note": "CPU smoke run: no ceilings"}
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = timer.eager(lambda: a @ b)
    src = torch.randn(2**28, device=device)  # 1 GiB read + 1 GiB written
    dst = torch.empty_like(src)
    copy = timer.eager(lambda: dst.copy_(src))
    return {"mm_bf16_tflops": 2 * 8192**3 / (mm * 1e-3) / 1e12, "copy_tb_s": 2 * src.nbytes / (copy * 1e-3) / 1e12}


def candidates(arch: int | None, dtype: torch.dtype, kind: str, smoke: bool) -> list[kcfg.MatmulConfig]:
    """The configs to time: config.tuning_candidates (every one AOT-checked by tests/test_triton_aot.py);
    on the interpreter, its one config with TMA descriptors (the smoke run checks the harness only)."""
    if smoke:
        return [kcfg.INTERPRETER_CONFIG, dataclasses.replace(kcfg.INTERPRETER_CONFIG, tma=True)]
    return kcfg.tuning_candidates(arch, dtype, kind)


def table_config(device, dtype, m, n, k, kind) -> kcfg.MatmulConfig:
    return kcfg.matmul_config(device, dtype, m, n, k, kind=kind)


class Run:
    """The JSON document and its incremental writing."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.smoke = args.smoke
        self.timer = Timer(device, args.smoke)
        self.start = time.monotonic()
        self.budget_s = args.budget_minutes * 60
        self.splits = (0, 1, 2) if args.smoke else SPLITS
        cuda = device.type == "cuda"
        self.arch = kcfg.arch_of(device.index or 0) if cuda else None
        # Persistent launches only where they are offered and AOT-checked (config.PERSISTENT_MIN_ARCH).
        self.persistence = (False, True) if args.smoke or (self.arch or 0) >= kcfg.PERSISTENT_MIN_ARCH else (False,)
        name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
        stamp = datetime.date.today().isoformat()
        self.path = Path(args.out) / f"tune-{'smoke' if args.smoke else name.replace(' ', '_')}-{stamp}.json"
        self.doc = {
            "schema": SCHEMA, "smoke": args.smoke, "device": name, "commit": git_commit(),
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
            "arch": self.arch, "sms": kcfg.sm_count(device),
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
            "budget_minutes": args.budget_minutes, "complete": False, "elapsed_s": 0.0,
            "ceilings": None, "results": [], "skipped": [], "winners": [], "notes": [],
        }
        if args.smoke:
            self.doc["notes"].append("smoke run under the Triton CPU interpreter: the times are wall clock of "
                                     "interpreted kernels and say nothing about GPU speed")

    def out_of_time(self) -> bool:
        return time.monotonic() - self.start > self.budget_s

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.start, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(self.path)

    def add(self, row: dict) -> None:
        self.doc["results"].append(row)


def _poisoned(fn):
    """fn() with every kernel work buffer NaN-filled first (workspace.FILL_VARIABLE)."""
    return with_environment(FILL_VARIABLE, "nan", fn)


def ns_item(run: Run, m: int, n: int, batch: int) -> None:
    """The whole recurrence per implementation and config at one shape."""
    if run.out_of_time():  # before the fp64 reference: a spent budget computes nothing more
        run.doc["skipped"].append(f"ns {m}x{n}x{batch}")
        return
    device, timer = run.device, run.timer
    g = torch.Generator(device="cpu").manual_seed(m * 7919 + n * 31 + batch)
    G = torch.randn(batch, m, n, generator=g).to(device)
    ref = recurrence.standard(G.double() / G.double().norm(dim=(-2, -1), keepdim=True), [COEFFICIENTS] * STEPS,
                              recurrence.MatmulOps(gram=lambda X: X @ X.mT, poly=lambda A, b, c: b * A + c * (A @ A),
                                                   apply=lambda B, X, a: a * X + B @ X))
    baseline = {dt: rel_err(plain_recurrence(G, dt), ref) for dt in (torch.bfloat16, torch.float16)}
    bound = {dt: 2 * e + 1e-2 for dt, e in baseline.items()}
    bound[torch.float32] = 1e-4
    flops = naive_flops(m, n, batch)
    impls = []
    for dtype in (torch.bfloat16,):
        impls.append(("ours", "standard", dtype, None, lambda dt=dtype: newton_schulz(G, _ns_config(), dt)))
        # What the optimizer runs: the backend also picks the one-kernel path for small matrices.
        impls.append(("ours-backend", "standard", dtype, None,
                      lambda dt=dtype: triton_backend.orthogonalize(G, _ns_config(), dt)))
        # The call recorded once and replayed (triton_kernels/replay.py; "ours" runs every call's
        # Python): the difference is the host time replay saves (bench/README.md).
        impls.append(("ours-replayed", "standard", dtype, None,
                      lambda dt=dtype: replay.call(newton_schulz, G, _ns_config(), dt)))
        # The same launches through Triton's own dispatch (launch.direct_launches off): the
        # difference to "ours" is the host time direct launches save (bench/README.md).
        impls.append(("ours-triton-dispatch", "standard", dtype, None,
                      lambda dt=dtype: through_triton_dispatch(lambda: newton_schulz(G, _ns_config(), dt))))
        # The measuring mode's "cublas" path: this normalization, cuBLAS's GEMMs; and its
        # "symmetric-cublas" path: the symmetric products here, cuBLAS's a·X + B·X.
        for path in ("cublas", "symmetric-cublas"):
            impls.append((f"ours-{path}", "standard", dtype, None,
                          lambda dt=dtype, p=path: triton_backend.orthogonalize(G, _ns_config(), dt, path=p)))
        for cfg in candidates(run.arch, dtype, "symmetric", run.smoke)[1 if run.smoke else 0:]:
            impls.append(("ours", "standard", dtype, cfg,
                          lambda dt=dtype, c=cfg: _forced(c, c, lambda: newton_schulz(G, _ns_config(), dt))))
    for dtype, restarts in ((torch.bfloat16, None), (torch.float16, None), (torch.float16, [2])):
        name = "ours-gram" + ("" if restarts is None else f"-restart{'-'.join(map(str, restarts))}")
        impls.append((name, "gram", dtype, None,
                      lambda dt=dtype, r=restarts: newton_schulz(G, _ns_config("gram", r), dt)))
    muon = torch_muon_routine()
    if muon is not None:
        impls.append(("torch.optim.Muon", "standard", torch.bfloat16, None, lambda: muon(G)))
    impls.append(("cublas-recurrence", "standard", torch.bfloat16, None, lambda: plain_recurrence(G, torch.bfloat16)))
    if available_backends(device)["cuda"][0]:  # the CUDA fallback (issue 25: ≥ 0.6× the cuBLAS recurrence)
        cuda = select_backend("cuda", device)[0]
        impls += [("cuda", "standard", torch.bfloat16, None, lambda: cuda.orthogonalize(G, _ns_config(), torch.bfloat16)),
                  ("cuda-sm75", "standard", torch.bfloat16, None,
                   lambda: with_environment(cuda.PATH_ENV, "sm75",
                                            lambda: cuda.orthogonalize(G, _ns_config(), torch.bfloat16))),
                  ("cuda-cublas", "standard", torch.bfloat16, None,
                   lambda: cuda.orthogonalize(G, _ns_config(), torch.bfloat16, path="cublas"))]
    for impl, algorithm, dtype, cfg, fn in impls:
        if run.out_of_time():
            run.doc["skipped"].append(f"ns {m}x{n}x{batch} {impl} {cfg.label() if cfg else ''}".strip())
            continue
        row = {"item": "ns", "shape": [m, n], "batch": batch, "dtype": str(dtype).removeprefix("torch."),
               "impl": impl, "algorithm": algorithm, "config": dataclasses.asdict(cfg) if cfg else None,
               "label": cfg.label() if cfg else "table", "flops": flops}
        plans_before = replay.plans()
        try:
            first = _poisoned(fn)
            row["rel_err"] = rel_err(first, ref)
            row["bound"] = bound[dtype]
            row["ok"] = bool(torch.isfinite(first).all()) and row["rel_err"] <= bound[dtype]
            row["repeatable"] = bool(torch.equal(first, fn()))
            row["ms"] = timer.eager(fn)
            if impl == "ours-replayed":  # a new recording since this row began (this shape's own key)
                row["recorded"] = replay.plans() > plans_before
            row["host_us"] = timer.host(fn)
            row["ms_graph"] = None if run.smoke else _try(lambda: timer.graph(fn))
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        except Exception as e:  # recorded, not fatal: one broken variant must not lose the run
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        run.add(row)
        run.write()


def _forced(sym_cfg, upd_cfg, fn):
    with kcfg.forced(symmetric=sym_cfg, ns_update=upd_cfg):
        return fn()


def _try(fn):
    try:
        return fn()
    except Exception as e:  # a variant that cannot be graph-captured keeps its eager time
        return f"{type(e).__name__}: {e}"[:200]


def product_item(run: Run, m: int, n: int, batch: int) -> None:
    """Each product alone, per candidate config, split factor and persistence."""
    if run.out_of_time():
        run.doc["skipped"].append(f"product {m}x{n}x{batch}")
        return
    device, timer, dtype = run.device, run.timer, torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(m + n + batch)
    X = (torch.randn(batch, m, n, generator=g) / (m * n) ** 0.5 * 4).to(device, dtype)
    A = symmetric_matmul(X)
    sms = kcfg.sm_count(device)
    products = {
        "gram": ("symmetric", m, m, n, lambda c: symmetric_matmul(X, config=c)),
        "poly": ("symmetric", m, m, m, lambda c: symmetric_matmul(A, alpha=2.0315, D=A, beta=-4.775, config=c)),
        "update": ("ns_update", m, n, m, lambda c: ns_update(A, X, 3.4445, config=c)),
    }
    # cuBLAS's batched GEMM for the same product: what the "symmetric-cublas" path hands it
    # (a·X + B·X) and what our symmetric products save FLOPs against (X·Xᵀ, b·A + c·A·A).
    cublas = {"gram": lambda: torch.bmm(X, X.mT), "poly": lambda: torch.baddbmm(A, A, A, beta=-4.775, alpha=2.0315),
              "update": lambda: torch.baddbmm(X, A, X, beta=3.4445)}
    exact = {"gram": X.double() @ X.double().mT,
             "poly": 2.0315 * A.double() @ A.double() - 4.775 * A.double(),
             "update": 3.4445 * X.double() + A.double() @ X.double()}
    for product, (kind, pm, pn, pk, call) in products.items():
        table = table_config(device, dtype, pm, pn, pk, kind)
        for cfg in candidates(run.arch, dtype, kind, run.smoke):
            # Split factors are swept on the table's config; the other configs take the model's split.
            full = kind == "symmetric" and cfg == dataclasses.replace(table, split_k=0)
            for split in (run.splits if full else (0,)):
                for persistent in run.persistence:
                    c = dataclasses.replace(cfg, split_k=split, persistent=persistent)
                    label = c.label()
                    if run.out_of_time():
                        run.doc["skipped"].append(f"product {product} {m}x{n}x{batch} {label}")
                        continue
                    row = {"item": "product", "product": product, "kind": kind, "shape": [m, n], "batch": batch,
                           "dtype": "bfloat16", "config": dataclasses.asdict(c), "label": label,
                           "table": dataclasses.replace(table, split_k=0) == dataclasses.replace(c, split_k=0)
                           and split == 0, "shape_class": kcfg.shape_class(pm, pn),
                           "flops": product_flops(product, m, n, batch)}
                    if kind == "symmetric":
                        tiles, s, _, _ = launch_shape(batch, pm, pk, c, sms)
                        iters = triton.cdiv(pk, c.block_k)
                        row.update(tiles=tiles, splits=s, iterations=iters,
                                   predicted=kcfg.split_cost(tiles, iters, sms, s))
                    run.add(_product_measured(row, lambda c=c: call(c), exact[product], timer))
                run.write()
        if run.out_of_time():
            run.doc["skipped"].append(f"product-cublas {product} {m}x{n}x{batch}")
            continue
        row = {"item": "product-cublas", "product": product, "shape": [m, n], "batch": batch, "dtype": "bfloat16",
               "config": None, "label": "cublas", "flops": product_flops(product, m, n, batch)}
        run.add(_product_measured(row, cublas[product], exact[product], timer))
        run.write()


def _product_measured(row: dict, call, exact: torch.Tensor, timer) -> dict:
    """``row`` with the product's error against fp64 (work buffers NaN-poisoned), whether its bits
    repeat, and its eager time — or the error it raised."""
    try:
        out = _poisoned(call)
        row["rel_err"] = rel_err(out, exact)
        row["ok"] = bool(torch.isfinite(out).all()) and row["rel_err"] <= 2e-2
        row["repeatable"] = bool(torch.equal(out, call()))
        row["ms"] = timer.eager(call)
        row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    return row


def winners(doc: dict) -> list[dict]:
    """Per (dtype, kind, shape class): the product config with the least total time over the class's
    shapes, kept where it beats the table's config by more than NOISE. Split factors other than
    "auto" (0) and "never" (1) are per-shape facts for refitting the split model, not winners."""
    rows = [r for r in doc["results"] if r["item"] == "product" and r.get("ok") and "ms" in r
            and r["config"]["split_k"] in (0, 1)]
    out = []
    groups = {(r["dtype"], r["kind"], r["shape_class"]) for r in rows}
    for dtype, kind, klass in sorted(groups):
        group = [r for r in rows if (r["dtype"], r["kind"], r["shape_class"]) == (dtype, kind, klass)]
        points = {(tuple(r["shape"]), r["batch"], r["product"]) for r in group}
        totals: dict[str, float] = {}
        configs: dict[str, dict] = {}
        for r in group:
            totals[r["label"]] = totals.get(r["label"], 0.0) + r["ms"]
            configs[r["label"]] = r["config"]
        complete = [lbl for lbl in totals if sum(1 for r in group if r["label"] == lbl) == len(points)]
        table = [r["label"] for r in group if r["table"]]
        if not complete or not table or table[0] not in complete:
            continue
        best = min(complete, key=lambda lbl: (totals[lbl], lbl))
        if totals[best] < (1 - NOISE) * totals[table[0]]:
            out.append({"arch": doc["arch"], "dtype": dtype, "kind": kind, "shape_class": klass,
                        "config": configs[best], "ms": totals[best], "table_ms": totals[table[0]],
                        "speedup": totals[table[0]] / totals[best]})
    return out


def summary(doc: dict) -> str:
    """The short table: per shape, the best of ours (and which) against each reference."""
    lines = [f"{'shape':>16} {'impl':<28} {'ms':>9} {'graph ms':>9} {'TFLOP/s':>8} {'err':>9} ok"]
    ns = [r for r in doc["results"] if r["item"] == "ns" and "ms" in r]
    for key in sorted({(tuple(r["shape"]), r["batch"]) for r in ns}):
        here = [r for r in ns if (tuple(r["shape"]), r["batch"]) == key]
        ours = [r for r in here if r["impl"].startswith("ours") and r.get("ok")]
        shown = ([min(ours, key=lambda r: r["ms"])] if ours else []) + \
                [r for r in here if r["impl"] == "ours" and r["label"] == "table"] + \
                [r for r in here if not r["impl"].startswith("ours")]
        for r in dict((id(r), r) for r in shown).values():
            graph = r.get("ms_graph")
            name = f"{r['impl']}[{r['label']}]" if r["impl"].startswith("ours") else r["impl"]
            lines.append(f"{'x'.join(map(str, key[0])) + f'x{key[1]}':>16} {name[:28]:<28} {r['ms']:9.3f} "
                         f"{graph if isinstance(graph, float) else float('nan'):9.3f} {r['tflops']:8.1f} "
                         f"{r.get('rel_err', float('nan')):9.2e} {r.get('ok')}")
    for w in doc["winners"]:
        cfg = w["config"]
        lines.append(f"TUNED[({w['arch']}, {w['dtype']!r}, {w['kind']!r}, {w['shape_class']!r})] = MatmulConfig("
                     + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + f")  # {w['speedup']:.2f}x over the table")
    if doc["skipped"]:
        lines.append(f"budget reached: {len(doc['skipped'])} items skipped (complete: false)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON")
    parser.add_argument("--budget-minutes", type=float, default=4.5, help="start no new item after this")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes: checks the harness")
    parser.add_argument("--shapes", nargs="*", default=None, help="m,n,batch triples instead of the default list")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: run with --smoke (the interpreter harness check)")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else \
        (SMOKE_SHAPES if args.smoke else SHAPES)
    run = Run(args, device)
    run.doc["shapes"] = [list(s) for s in shapes]
    run.doc["ceilings"] = ceilings(device, run.timer)
    run.write()
    # The shapes we lose at (the first FIRST_SHAPES) each with its whole-recurrence rows (the answer to
    # "do we win") and its product sweeps (what the config table and the split model are refit
    # from), then the other shapes' recurrence rows, then their sweeps: a budget that runs out keeps
    # the sweeps that matter most.
    for m, n, batch in shapes[:FIRST_SHAPES]:
        ns_item(run, m, n, batch)
        product_item(run, m, n, batch)
    for m, n, batch in shapes[FIRST_SHAPES:]:
        ns_item(run, m, n, batch)
    for m, n, batch in shapes[FIRST_SHAPES:]:
        product_item(run, m, n, batch)
    run.doc["winners"] = [] if args.smoke else winners(run.doc)  # interpreter times pick nothing
    run.doc["complete"] = not run.doc["skipped"]
    run.write()
    print(summary(run.doc))
    print(f"wrote {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
