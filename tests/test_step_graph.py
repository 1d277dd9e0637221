"""``Muon(cuda_graph=True)``'s capture logic (muon_kernels/graphs.py) on a CPU, with a stand-in for
the CUDA graph: when a step runs eagerly, is captured or is replayed, what invalidates a capture,
the warning when nothing can be replayed, and the errors for what cannot be captured. The real
capture and replay, bit for bit against eager steps, is tests/gpu/test_graphs_gpu.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels import graphs


class FakeGraph:
    """Records the captured work and "replays" it by running it again."""

    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run()


def test_a_key_runs_eagerly_then_is_captured_then_replayed():
    g = graphs.StepGraph(capture_fn=FakeGraph)
    ran = []
    modes = [g.step(key, lambda: ran.append(1)) for key in ["a", "a", "a", "b", "b", "b", "a"]]
    assert modes == ["eager", "capture", "replay", "eager", "capture", "replay", "eager"]
    assert len(ran) == len(modes) and g.captures == 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))


def _graphed(model, **kw):
    opt = mk.Muon(model.parameters(), lr=0.02, ns_dtype=torch.float32, capturable=True, **kw)
    opt._graph = graphs.StepGraph(capture_fn=FakeGraph)  # cuda_graph=True refuses CPU parameters
    return opt


def _modes(opt, model, steps, set_to_none=False, lrs=None):
    modes = []
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        for p in model.parameters():
            grad = torch.randn(p.shape, generator=g)
            if p.grad is None or set_to_none:
                p.grad = grad
            else:
                p.grad.copy_(grad)
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        record = []
        step = opt._graph.step
        opt._graph.step = lambda key, run: record.append(step(key, run))
        opt.step()
        opt._graph.step = step
        modes += record
    return modes


def test_static_storages_are_captured_once_and_replayed():
    model, twin = _model(), _model()
    opt = _graphed(model)
    modes = _modes(opt, model, 5)
    # step 1 is the eager warm-up (it creates the state), step 2 is captured and replayed
    assert modes == ["eager", "capture", "replay", "replay", "replay"]
    ref = mk.Muon(twin.parameters(), lr=0.02, ns_dtype=torch.float32)
    _modes_plain(ref, twin, 5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _modes_plain(opt, model, steps):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def test_reallocated_gradients_run_eagerly_with_one_warning():
    model = _model()
    opt = _graphed(model)
    with pytest.warns(UserWarning, match=r"set_to_none=False") as caught:
        modes = _modes(opt, model, 6, set_to_none=True)
    assert set(modes) == {"eager"} and len(caught) == 1


def test_a_float_lr_rewritten_every_step_names_tensor_lr():
    model = _model()
    opt = _graphed(model)
    with pytest.warns(UserWarning, match=r"device\s+tensors"):
        modes = _modes(opt, model, 6, lrs=[0.02 - 0.001 * i for i in range(6)])
    assert set(modes) == {"eager"}


def test_a_tensor_lr_written_in_place_keeps_the_graph():
    model = _model()
    lr = torch.tensor(0.02)
    opt = mk.Muon(model.parameters(), lr=lr, ns_dtype=torch.float32, capturable=True)
    opt._graph = graphs.StepGraph(capture_fn=FakeGraph)
    modes = []
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(5):
            for p in model.parameters():
                grad = torch.randn(p.shape, generator=g)
                p.grad = grad if p.grad is None else p.grad.copy_(grad)
            lr.fill_(0.02 - 0.001 * i)
            step = opt._graph.step
            opt._graph.step = lambda key, run: modes.append(step(key, run))
            opt.step()
            opt._graph.step = step
    assert modes == ["eager", "capture", "replay", "replay", "replay"]


def test_load_state_dict_recaptures():
    model = _model()
    opt = _graphed(model)
    assert _modes(opt, model, 3) == ["eager", "capture", "replay"]
    opt.load_state_dict(opt.state_dict())  # new state tensors: the plan is rebuilt, the graph is stale
    assert _modes(opt, model, 3) == ["eager", "capture", "replay"]


def test_cuda_graph_refuses_what_it_cannot_capture():
    with pytest.raises(ValueError, match=r"cuda_graph=True captures CUDA kernels, but parameter #0 .* is on cpu"):
        mk.Muon(_model().parameters(), cuda_graph=True)
    for key in ("cuda_graph", "overlap_adamw"):
        with pytest.raises(ValueError, match=f"{key} must be True or False"):
            mk.Muon(_model().parameters(), **{key: "yes"})


def test_a_failed_capture_steps_eagerly_from_then_on():
    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    model = _model()
    opt = _graphed(model)
    opt._graph.capture = broken
    with pytest.warns(UserWarning, match="capturing the step failed"):
        modes = _modes(opt, model, 4)
    assert modes == ["eager"] * 4 and opt._graph.failed


def test_a_changed_setting_drops_the_graph_before_it_is_replayed_again():
    """A captured graph reads device tables that an eager step with other values may free: it is
    dropped, and the old key captures anew instead of replaying."""
    model = _model()
    opt = _graphed(model)
    lrs = [0.02, 0.02, 0.02, 0.0, 0.02, 0.02, 0.02]
    assert _modes(opt, model, 7, lrs=lrs) == ["eager", "capture", "replay", "eager", "eager", "capture", "replay"]


def test_every_group_must_be_capturable():
    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02, ns_dtype=torch.float32)
    opt._graph = graphs.StepGraph(capture_fn=FakeGraph)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="capturable=False"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
