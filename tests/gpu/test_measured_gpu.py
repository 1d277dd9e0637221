"""backend="auto" by measurement on a real GPU (marked ``gpu``; skipped without one): every path that
can run is timed, the fastest within the accuracy band is kept and persisted, a new optimizer reuses
it without timing, and the measured step equals the chosen backend's math."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import muon_kernels as mk
from muon_kernels.backends import measured

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from oracles import plain_recurrence, reference_ns, rel_err  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")
# A one-CTA matrix (Triton's small path competes), GPT-2's square bucket, a skinny LLaMA-like one.
SHAPES = [(64, 256), (768, 768), (1024, 4096)]


@pytest.fixture(autouse=True)
def cache(dispatch_cache):
    return dispatch_cache


def _params(shapes, batch=4):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=g) / s[1] ** 0.5).to(DEV)) for s in shapes for _ in range(batch)]


def _fill(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(DEV)


def test_the_fastest_path_is_chosen_persisted_and_reused(cache, monkeypatch):
    ps = _params(SHAPES)
    opt = mk.Muon(ps, lr=0.02)
    _fill(ps, 0)
    opt.step()
    records = json.loads(cache.read_text())
    assert len(records) == len(SHAPES)
    for record in records.values():
        assert len(record["ms"]) >= 2 and record["choice"] == min(record["ms"], key=record["ms"].get)
    chosen = {f"{b.backend.NAME}:{b.path}" for b in opt._buckets}
    assert chosen <= {r["choice"].removesuffix(":gram") for r in records.values()}
    assert all("auto (measured)" in b.why for b in opt._buckets)
    assert all("auto (measured)" in r.why for r in opt.plan())
    # The Triton backend's cuBLAS-products paths compete at every shape, beside the torch backend's.
    assert all({"triton:cublas", "triton:symmetric-cublas", "torch:baddbmm"} <= set(r["ms"])
               for r in records.values()), records

    def no_timing(*args):
        raise AssertionError("timed again although the choice was cached")

    monkeypatch.setattr(measured, "time_candidate", no_timing)
    measured._MEMO.clear()  # as in a new process: the choice comes from the file
    again = mk.Muon(ps, lr=0.02)
    _fill(ps, 1)
    again.step()
    assert [(b.backend, b.path) for b in again._buckets] == [(b.backend, b.path) for b in opt._buckets]


@pytest.mark.parametrize("shape", SHAPES)
def test_measured_orthogonalize_stays_in_the_band(shape):
    G = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3)).float()
    ref = reference_ns(G.double(), "keller")
    bound = 2 * rel_err(plain_recurrence(G, torch.bfloat16, "keller", None), ref) + 1e-2
    out = mk.orthogonalize(G.to(DEV), ns_dtype=torch.bfloat16).cpu()
    assert out.dtype == G.dtype and rel_err(out, ref) <= bound


def test_a_graphed_step_is_measured_as_graph_replays_and_still_captures(cache, monkeypatch):
    """cuda_graph=True: every candidate is timed as replays of a captured graph (a path that cannot be
    captured, or whose replayed result leaves the band, is excluded), the records say so under keys of
    their own, and the step built on the choices captures once, replays, and computes the bits an
    eager optimizer running the same kernels computes."""
    captures = []
    capture = measured.graphs.capture
    monkeypatch.setattr(measured.graphs, "capture", lambda run: captures.append(1) or capture(run))

    def run(opt, ps):
        for seed in range(3):  # eager (measures), captured, replayed: gradients keep their storage
            g = torch.Generator().manual_seed(seed)
            for p in ps:
                grad = torch.randn(p.shape, generator=g).to(DEV)
                p.grad = grad if p.grad is None else p.grad.copy_(grad)
            opt.step()
        return [p.detach().clone() for p in ps]

    ps = _params(SHAPES[:2])
    opt = mk.Muon(ps, lr=0.02, cuda_graph=True)
    graphed = run(opt, ps)
    records = json.loads(cache.read_text())
    assert len(records) == 2 and all(key.endswith("|graph replays") for key in records)
    for record in records.values():
        assert record["timed"] == "graph replays" and all(ms > 0 for ms in record["ms"].values())
        assert len(record["ms"]) >= 2 and record["choice"] == min(record["ms"], key=record["ms"].get)
    assert len(captures) == sum(len(r["ms"]) for r in records.values())  # each timed candidate was captured
    assert all("auto (measured, graph replays)" in b.why for b in opt._buckets)
    assert not opt._graph.failed and opt._graph.captures == 1
    # An eager optimizer reading the same records (its key made the graph's) runs the same kernels.
    key = measured._key
    monkeypatch.setattr(measured, "_key",
                        lambda bucket, batch, labels, replayed=False: key(bucket, batch, labels, True))
    twin_ps = _params(SHAPES[:2])
    twin = mk.Muon(twin_ps, lr=0.02)
    eager = run(twin, twin_ps)
    assert [(b.backend, b.path) for b in twin._buckets] == [(b.backend, b.path) for b in opt._buckets]
    assert all(torch.equal(a, b) for a, b in zip(graphed, eager))
