"""``Muon(cuda_graph=True)`` and the AdamW side stream on a real GPU (marked ``gpu``; skipped without
one): replayed steps equal eager steps bit for bit (static gradients, a tensor lr written in place
between steps), reallocated gradients fall back to eager steps with one warning, and AdamW on a side
stream gives the same bits as on the main stream, also while gradients are freed and reallocated
every step under the caching allocator."""

from __future__ import annotations

import pytest
import torch

import muon_kernels as mk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")
SHAPES = [(768, 768), (3072, 768), (768, 3072), (64, 256)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter((torch.randn(s, generator=g) / s[1] ** 0.5).to(DEV)) for s in SHAPES]
    vecs = [torch.nn.Parameter(torch.randn(768, generator=g).to(DEV)) for _ in range(3)]
    return mats, vecs


def _opt(mats, vecs, lr, **kw):
    # The static dispatch table: a graphed optimizer measures "auto" buckets as graph replays, an eager
    # one as eager calls, and the two timings may choose other kernels (other bits) for the same
    # bucket; tests/gpu/test_measured_gpu.py covers the measured choice under cuda_graph=True.
    kw.setdefault("dispatch", "table")
    return mk.Muon([{"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False}], lr=lr,
                   adamw_lr=torch.tensor(1e-3, device=DEV), capturable=True, **kw)


def _grads(ps, seed, static=True):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        new = torch.randn(p.shape, generator=g).to(DEV)
        if static and p.grad is not None:
            p.grad.copy_(new)
        else:
            p.grad = new


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_replayed_steps_equal_eager_steps_bit_for_bit(backend):
    runs = []
    for graph in (False, True):
        mats, vecs = _params()
        lr = torch.tensor(0.02, device=DEV)
        opt = _opt(mats, vecs, lr, cuda_graph=graph, backend=backend)
        for i in range(6):
            lr.fill_(0.02 * (1 - i / 10))  # a scheduler writing the tensor lr in place
            _grads(mats + vecs, i)
            opt.step()
        runs.append([p.detach().clone() for p in mats + vecs])
        if graph:
            assert opt._graph.captures == 1 and opt._graph.graph is not None
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_reallocated_gradients_step_eagerly_with_a_warning():
    mats, vecs = _params()
    opt = _opt(mats, vecs, torch.tensor(0.02, device=DEV), cuda_graph=True)
    with pytest.warns(UserWarning, match="set_to_none=False"):
        for i in range(5):
            _grads(mats + vecs, i, static=False)
            opt.step()
    assert opt._graph.captures == 0


def test_adamw_on_a_side_stream_gives_the_same_bits_under_the_caching_allocator():
    runs = []
    for overlap in (False, True):
        mats, vecs = _params()
        opt = _opt(mats, vecs, torch.tensor(0.02, device=DEV), overlap_adamw=overlap)
        for i in range(8):
            _grads(mats + vecs, i, static=False)  # fresh gradients every step, freed after it
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.empty(64 * 2**20, device=DEV).fill_(float("nan"))  # reuse freed blocks at once
        torch.cuda.synchronize()
        runs.append([p.detach().clone() for p in mats + vecs])
        assert (mats[0].device in opt._side_streams) == overlap  # keyed by the parameters' device (cuda:0)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_device_tensor_momentum_is_refused_before_the_capture():
    """A step reads momentum and weight decay on the host: as CUDA tensors they would be a sync inside
    the capture. Refused with the setting named, before anything is modified."""
    mats, vecs = _params()
    opt = _opt(mats, vecs, torch.tensor(0.02, device=DEV), cuda_graph=True)
    opt.param_groups[0]["momentum"] = torch.tensor(0.95, device=DEV)
    _grads(mats + vecs, 0)
    before = [p.detach().clone() for p in mats + vecs]
    with pytest.raises(ValueError, match="param group 0: momentum is a device tensor"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(mats + vecs, before))


def test_replaced_state_is_captured_anew_bit_for_bit():
    """State replaced by hand after a capture (same values, new memory) gives the eager step's bits:
    the graph is dropped, not replayed on the old memory."""
    runs = []
    for graph in (False, True):
        mats, vecs = _params()
        opt = _opt(mats, vecs, torch.tensor(0.02, device=DEV), cuda_graph=graph)
        for i in range(6):
            if i == 3:
                for p in mats + vecs:
                    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
            _grads(mats + vecs, i)
            opt.step()
        runs.append([p.detach().clone() for p in mats + vecs])
        if graph:
            assert opt._graph.captures == 2
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_two_threads_capture_their_own_graphs_at_once():
    """Two optimizers stepped in two threads each capture and replay their own graph: their captures
    take turns (entering one synchronizes the device, which would invalidate the other's under way),
    and both give the eager bits."""
    import threading

    def run(seed, graph, out, barrier=None):
        mats, vecs = _params(seed)
        opt = _opt(mats, vecs, torch.tensor(0.02, device=DEV), cuda_graph=graph)
        with torch.cuda.stream(torch.cuda.Stream()):  # each thread's own work stream, as a trainer's
            for i in range(6):
                if barrier is not None:
                    barrier.wait()  # both threads reach each step (the capture at step 2) together
                _grads(mats + vecs, seed * 10 + i)
                opt.step()
            torch.cuda.current_stream().synchronize()
        out[seed] = ([p.detach().clone() for p in mats + vecs], opt._graph.captures if graph else None,
                     opt._graph.failed if graph else None)

    eager: dict = {}
    for seed in (1, 2):
        run(seed, False, eager)
    graphed: dict = {}
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=run, args=(seed, True, graphed, barrier)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in (1, 2):
        params, captures, failed = graphed[seed]
        assert captures == 1 and not failed, seed
        assert all(torch.equal(a, b) for a, b in zip(params, eager[seed][0])), seed


def test_a_failed_capture_steps_eagerly_on_the_callers_stream():
    """A capture that fails (here a device synchronize inside it) warns once, steps eagerly with the
    eager steps' bits, and leaves the caller's stream current: torch.cuda.graph's exit raises at the
    capture's end, before it switches streams back, and graphs.capture restores the stream itself."""
    import warnings

    from muon_kernels import graphs

    runs = []
    for graph in (False, True):
        mats, vecs = _params()
        opt = _opt(mats, vecs, torch.tensor(0.02, device=DEV), cuda_graph=graph)
        if graph:
            opt._graph.capture = lambda run: graphs.capture(lambda: (run(), torch.cuda.synchronize()))
        caller = torch.cuda.Stream()
        with torch.cuda.stream(caller), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(4):
                _grads(mats + vecs, i)
                opt.step()
                assert torch.cuda.current_stream() == caller, i
            caller.synchronize()
        if graph:
            assert opt._graph.failed and opt._graph.captures == 0
            assert sum("capturing the step failed" in str(w.message) for w in caught) == 1
        runs.append([p.detach().clone() for p in mats + vecs])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
