"""``Muon(cuda_graph=True)``'s capture logic (muon_kernels/graphs.py) on a CPU, with a stand-in for
the CUDA graph: when a step runs eagerly, is captured or is replayed, what invalidates a capture,
the warning when nothing can be replayed, and the errors for what cannot be captured. The real
capture and replay, bit for bit against eager steps, is tests/gpu/test_graphs_gpu.py."""

from __future__ import annotations

import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels import graphs
from muon_kernels.distributed import Placement


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
    modes = [g.step(lambda key=key: key, lambda: ran.append(1)) for key in ["a", "a", "a", "b", "b", "b", "a"]]
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
    """One attempt only, and the warning names the root cause where the capture's end raised over it
    (a failed capture_end reports "operation failed due to a previous error during capture")."""
    attempts = []

    def broken(run):
        attempts.append(run)
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")

    model = _model()
    opt = _graphed(model)
    opt._graph.capture = broken
    with pytest.warns(UserWarning, match=r"capturing the step failed \(RuntimeError\('operation failed due to a "
                                         r"previous.*raised while handling RuntimeError\('operation not permitted"):
        modes = _modes(opt, model, 4)
    assert modes == ["eager"] * 4 and opt._graph.failed and len(attempts) == 1


class _FakeCuda:
    """The CUDA calls of ``graphs.capture`` on a CPU, around torch's real ``torch.cuda.graph`` context
    manager (its order of operations is what matters): streams as names, current per thread like
    torch's; a graph whose ``capture_end`` raises when the captured work raised, as
    cudaStreamEndCapture does after an operation invalidated the capture; the captures under way."""

    def __init__(self, monkeypatch):
        self.local = threading.local()
        self.lock = threading.Lock()
        self.under_way = self.most_at_once = 0
        fake = self

        class Context:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                self.previous = fake.current()
                fake.local.stream = self.stream

            def __exit__(self, *args):
                fake.local.stream = self.previous

        class Graph:
            def capture_begin(self, *args, **kwargs):
                with fake.lock:
                    fake.under_way += 1
                    fake.most_at_once = max(fake.most_at_once, fake.under_way)

            def capture_end(self):
                with fake.lock:
                    fake.under_way -= 1
                if sys.exc_info()[0] is not None:  # the captured work raised: the capture is invalid
                    raise RuntimeError("operation failed due to a previous error during capture")

            def replay(self):
                pass

        monkeypatch.setattr(graphs, "_CAPTURE_STREAMS", {})
        monkeypatch.setattr(torch.cuda, "graph", torch.cuda.graphs.graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "stream", Context)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: f"capture stream {device}")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        # torch 2.14's torch.cuda.graph asks for the capturing stream after capture_begin
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.current())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)  # absent from CPU builds

    def current(self) -> str:
        return getattr(self.local, "stream", "caller's stream")


def test_a_failed_capture_gives_the_thread_its_stream_back(monkeypatch):
    """torch.cuda.graph's exit ends the capture before it restores the stream, and a failed capture
    raises there: the eager fallback and every later step must still run on the caller's stream, not
    on the capture stream (which does not synchronize with the legacy default stream)."""
    cuda = _FakeCuda(monkeypatch)
    ran_on = []

    def run():
        ran_on.append(cuda.current())
        if len(ran_on) == 2:  # the captured call: a host sync inside the capture
            raise RuntimeError("operation not permitted when stream is capturing")

    g = graphs.StepGraph()  # the real capture function
    with pytest.warns(UserWarning, match="capturing the step failed"):
        modes = [g.step(lambda: "key", run) for _ in range(3)]
    assert modes == ["eager"] * 3 and g.failed
    assert ran_on == ["caller's stream", "capture stream 0", "caller's stream", "caller's stream"]
    assert cuda.current() == "caller's stream"


def test_captures_in_two_threads_take_turns(monkeypatch):
    """Only one capture under way in the process at a time (torch.cuda.graph's rule: entering one
    synchronizes the device, which invalidates another thread's capture): two optimizers' captures
    started together run one after the other, each on the capture stream, each thread's stream kept."""
    cuda = _FakeCuda(monkeypatch)
    barrier = threading.Barrier(2)
    seen: dict[int, tuple] = {}

    def work(i):
        def run():
            time.sleep(0.05)  # long enough for the other thread to try its own capture meanwhile
            seen[i] = (cuda.current(),)

        barrier.wait()
        graphs.capture(run)
        seen[i] += (cuda.current(),)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cuda.most_at_once == 1 and cuda.under_way == 0
    assert seen == {i: ("capture stream 0", "caller's stream") for i in range(2)}


def test_eager_steps_are_counted_anew_after_a_capture():
    """The warning counts eager steps in a row: a capture in between starts the count again."""
    g = graphs.StepGraph(capture_fn=FakeGraph)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modes = [g.step(lambda key=key: key, lambda: None) for key in ["a", "b", "b", "c", "d"]]
    assert modes == ["eager", "eager", "capture", "eager", "eager"]
    with pytest.warns(UserWarning, match="ran eagerly 3 times in a row"):
        g.step(lambda: "e", lambda: None)


def _placement(kind: str) -> Placement:
    return Placement(kind, None, None)


@pytest.mark.parametrize("kind", ["replicated", "sharded"])
def test_distributed_buckets_are_not_captured(kind):
    with pytest.raises(ValueError, match=r"does not capture the collectives of DDP/FSDP2"):
        graphs.check_capturable([], [_placement("local"), _placement(kind)], [])


@pytest.mark.parametrize("use_muon, key, value", [
    (True, "momentum", "tensor"), (True, "weight_decay", "tensor"),
    (False, "betas", (0.9, "tensor")), (False, "eps", "tensor"), (False, "weight_decay", "tensor"),
])
def test_a_setting_a_step_reads_on_the_host_may_not_be_a_device_tensor(use_muon, key, value):
    """A meta tensor stands in for a CUDA one (any device but the CPU is refused); a host tensor is fine."""
    def setting(device):
        as_tensor = lambda v: torch.tensor(0.5, device=device) if v == "tensor" else v  # noqa: E731
        return tuple(map(as_tensor, value)) if isinstance(value, tuple) else as_tensor(value)

    group = {"capturable": True, "use_muon": use_muon, "momentum": 0.95, "weight_decay": 0.1, "betas": (0.9, 0.95),
             "eps": 1e-8}
    graphs.check_capturable([{**group, key: setting("cpu")}], [_placement("local")], [])
    with pytest.raises(ValueError, match=rf"param group 0: {key} is a device tensor"):
        graphs.check_capturable([{**group, key: setting("meta")}], [_placement("local")], [])


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


def test_replaced_state_is_captured_anew():
    """A graph replays on the state tensors it was captured with: state replaced by hand (a trainer
    resetting the optimizer) must not be left to a graph reading the old, freed memory."""
    model, twin = _model(), _model()
    opt = _graphed(model)
    ref = mk.Muon(twin.parameters(), lr=0.02, ns_dtype=torch.float32)
    assert _modes(opt, model, 3) == ["eager", "capture", "replay"]
    _modes_plain(ref, twin, 3)
    for o, m in ((opt, model), (ref, twin)):
        for p in m.parameters():
            for key, value in o.state[p].items():
                o.state[p][key] = value.clone()  # same values, new memory
    assert _modes(opt, model, 3) == ["eager", "capture", "replay"]
    _modes_plain(ref, twin, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    opt.state.clear()
    assert _modes(opt, model, 2) == ["eager", "capture"]


def test_a_graph_over_several_devices_is_refused():
    model = _model()
    opt = _graphed(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    group = opt.param_groups[0]
    other = torch.zeros(2, 2, device="meta")
    other.grad = torch.zeros(2, 2, device="meta")
    with pytest.raises(ValueError, match=r"captures one device's work, but the parameters are on \['cpu', 'meta'\]"):
        opt._graph_key([(0, group, [group["params"][0], other])], opt._placements)


class _FakeStream:
    def __init__(self, name, device):
        self.name, self.device, self.waited = name, device, []

    def wait_stream(self, other):
        self.waited.append(other.name)


def test_the_adamw_side_stream_is_joined_when_the_step_raises(monkeypatch):
    """The side stream forks from the caller's stream; if the Muon half raises, the caller's stream
    must still wait for it (a capture needs the join, and a caller that catches the error may free
    the gradients AdamW is reading)."""
    import contextlib

    model = _model()
    opt = mk.Muon(model.parameters(), lr=0.02)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    main, side = _FakeStream("main", torch.device("cpu")), _FakeStream("side", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(opt, "_adamw_stream", lambda adamw, buckets: side)

    def broken(buckets, placements):
        raise RuntimeError("boom")

    monkeypatch.setattr(opt, "_muon_half", broken)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert side.waited == ["main"] and main.waited == ["side"]


def test_the_adamw_side_stream_is_used_on_one_cuda_device_and_never_while_compiling(monkeypatch):
    """AdamW overlaps the Muon half on a side stream (one per device, made once) where every AdamW
    parameter is on one CUDA device — but not while torch.compile traces the step: making and
    entering a stream inside a traced frame is what Dynamo supports least, and the caller's stream
    gives the same bits."""
    import types

    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or _FakeStream("side", device))
    opt = mk.Muon(_model().parameters(), lr=0.02)
    cuda0, cuda1 = (types.SimpleNamespace(device=torch.device("cuda", i)) for i in (0, 1))
    buckets = ["a bucket"]
    first = opt._adamw_stream([({}, [cuda0, cuda0])], buckets)
    assert first is not None and opt._adamw_stream([({}, [cuda0])], buckets) is first and len(made) == 1
    assert opt._adamw_stream([({}, [cuda0, cuda1])], buckets) is None  # two devices: the caller's stream
    assert opt._adamw_stream([({}, [cuda0])], []) is None  # no Muon work to overlap
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert opt._adamw_stream([({}, [cuda0])], buckets) is None
    opt.overlap_adamw = False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert opt._adamw_stream([({}, [cuda0])], buckets) is None


def test_launches_go_to_the_tensors_device(monkeypatch):
    """Triton launches (and a capture) go to the current device: a call on another GPU's tensors
    makes that GPU current for the call; on the current device or a CPU nothing is switched."""
    from muon_kernels.workspace import on_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    switch = on_device(torch.device("cuda", 0))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 0
    assert not isinstance(on_device(torch.device("cuda", 1)), torch.cuda.device)
    assert not isinstance(on_device(torch.device("cpu")), torch.cuda.device)


def test_the_key_holds_every_state_tensor_and_the_warning_names_a_rebuilt_plan():
    """A graph reads every state tensor, 0-d ones included (AdamW's step count, the stochastic
    rounding's counter): each is in the key. A plan rebuilt every step (an option toggled) is named."""
    p = nn.Parameter(torch.zeros(2, 3))
    state = {p: {"momentum_buffer": torch.zeros(2, 3), "momentum_step": torch.zeros((), dtype=torch.int64),
                 "note": "not a tensor"}}
    addresses = graphs.state_storages(state, [(0, {}, [p])])
    assert addresses == tuple(t.data_ptr() for t in list(state[p].values())[:2])
    storages, settings_key = (1, 2), ("lr", 0.02)
    assert "bucket plan was rebuilt" in graphs._what_changed((storages, settings_key, (1,)),
                                                             (storages, settings_key, (2,)))
    assert "state was replaced" in graphs._what_changed((storages, settings_key, (1,), addresses),
                                                        (storages, settings_key, (1,), ()))
