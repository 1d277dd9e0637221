"""backend="auto" by measurement (muon_kernels/backends/measured.py), on a CPU with stand-in backends
and made-up times (tests/dispatch_fakes.py): the fastest path within the accuracy band wins, the
choice persists and a new optimizer reuses it without timing, nothing is timed inside a CUDA-graph
capture, plan() shows the times, ``dispatch="table"`` keeps the table, and under DDP every rank
takes rank 0's choice (gloo, 2 processes)."""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings

import pytest
import torch
from torch import nn

import distributed_workers as workers
import muon_kernels as mk
from dispatch_fakes import FakeDispatch
from muon_kernels import graphs
from muon_kernels.backends import measured, torch_backend


@pytest.fixture(autouse=True)
def cache(dispatch_cache):
    return dispatch_cache


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))


def _step(opt, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def test_the_fastest_candidate_wins_and_persists(monkeypatch, cache):
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0, "middle": 2.0})
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    assert {b.backend.NAME for b in opt._buckets} == {"fast"}
    assert len(fake.timed) == 3 * len(opt._buckets)  # every candidate of every bucket timed once
    saved = json.loads(cache.read_text())
    assert len(saved) == len(opt._buckets)
    assert all(r["choice"] == "fast:default" and set(r["ms"]) == {"slow:default", "fast:default", "middle:default"}
               for r in saved.values())
    # A new process (a resumed run) reads the choice back from the file and times nothing.
    fake.timed.clear()
    measured._MEMO.clear()
    again = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(again, model)
    assert fake.timed == [] and {b.backend.NAME for b in again._buckets} == {"fast"}


@pytest.mark.parametrize("setting", ["cuda.matmul", "global"])
def test_tf32_set_through_torchs_newer_api_is_keyed_not_fatal(monkeypatch, cache, setting):
    """Once ``torch.backends.cuda.matmul.fp32_precision`` (or the global ``torch.backends.fp32_precision``)
    is set, torch's legacy getters raise ("mix of the legacy and new APIs"): the cache key reads the
    API in use, so the first step measures instead of raising, and "tf32" and "ieee" are timed apart."""
    FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    target = torch.backends.cuda.matmul if setting == "cuda.matmul" else torch.backends
    if not hasattr(target, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} predates the fp32_precision settings")
    before, keys = target.fp32_precision, []
    try:
        for value in ("tf32", "ieee"):
            target.fp32_precision = value
            measured._MEMO.clear()
            model = _model()
            opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
            _step(opt, model)
            assert {b.backend.NAME for b in opt._buckets} == {"fast"}
            keys.append(set(json.loads(cache.read_text())))
    finally:
        target.fp32_precision = before
    assert keys[0] and keys[1] - keys[0] and any("tf32" in key for key in keys[0])
    torch.get_float32_matmul_precision()  # the legacy API reads again: nothing left set


def test_the_steps_equal_the_chosen_backend_run_alone(monkeypatch):
    """The measured bucket computes exactly what that backend's math gives (here: the torch backend's)."""
    FakeDispatch(monkeypatch, {"a": 2.0, "b": 1.0})
    model, twin = _model(), _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    ref = mk.Muon(twin.parameters(), ns_dtype=torch.float32, backend="torch")
    for seed in range(3):
        _step(opt, model, seed)
        _step(ref, twin, seed)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_chosen_path_and_the_given_up_stack_reach_every_call(monkeypatch):
    """The measured kernel path is what the backend is called with — in one call, and in every chunk
    of a bucket the workspace cap splits — and the step gives its stack up (``consume``)."""
    fake = FakeDispatch(monkeypatch, {"only": 1.0})
    backend, calls = fake.backends["only"], []

    def orthogonalize(stack, config, ns_dtype, path=None, consume=False):
        calls.append((stack.shape[0], path, consume))
        return torch_backend.orthogonalize(stack, config, ns_dtype)

    backend.orthogonalize = orthogonalize
    monkeypatch.setattr(measured, "candidates", lambda bucket: [] if bucket.request is None else [
        measured.Candidate(backend, path, c) for c in measured.candidate_configs(bucket) for path in ("slow", "fast")])
    monkeypatch.setattr(measured, "time_candidate", lambda option, run, device: {"slow": 2.0, "fast": 1.0}[option.path])
    torch.manual_seed(0)
    stack = nn.Parameter(torch.randn(4, 16, 32))
    whole = mk.Muon([stack], ns_dtype=torch.float32, matrix_view="batch")
    for capped, sizes in ((False, [4]), (True, [1, 1, 1, 1])):  # capped: one matrix's workspace
        opt = whole if not capped else mk.Muon([stack], ns_dtype=torch.float32, matrix_view="batch",
                                               max_workspace_bytes=whole._buckets[0].matrix_bytes())
        stack.grad = torch.randn_like(stack)
        opt.step()  # measures, then steps
        calls.clear()
        opt.step()
        assert calls == [(size, "fast", True) for size in sizes]


def test_an_explicit_backend_is_not_measured(monkeypatch):
    """Only backend="auto" buckets are measured: a group that names its backend keeps it."""
    fake = FakeDispatch(monkeypatch, {"a": 1.0, "b": 2.0})
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32, backend="torch")
    _step(opt, model)
    assert fake.timed == [] and {b.backend.NAME for b in opt._buckets} == {"torch"}


def test_a_candidate_outside_the_accuracy_band_is_excluded(monkeypatch, cache):
    FakeDispatch(monkeypatch, {"wrong": 0.1, "right": 1.0}, wrong=("wrong",))
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.bfloat16)
    _step(opt, model)
    assert {b.backend.NAME for b in opt._buckets} == {"right"}
    for record in json.loads(cache.read_text()).values():
        assert "wrong:default" in record["excluded"] and "band" in record["excluded"]["wrong:default"]
        assert "wrong:default" not in record["ms"]


def test_accuracy_is_checked_on_the_first_and_last_matrices_of_the_batch(monkeypatch, cache):
    """The fp64 reference covers two matrices, not the batch (its copy and work buffers took ~5× the
    measured step's memory), and a path wrong only on the batch's last matrix is still excluded."""
    fake = FakeDispatch(monkeypatch, {"tail": 0.1, "right": 1.0})
    good = fake.backends["tail"].orthogonalize

    def wrong_at_the_end(stack, config, ns_dtype, path=None, consume=False):
        out = good(stack, config, ns_dtype)
        out[-1] *= 2
        return out

    fake.backends["tail"].orthogonalize = wrong_at_the_end
    fp64_batches = []
    plain = torch_backend.orthogonalize

    def spy(stack, config, ns_dtype, *args, **kwargs):
        if ns_dtype == torch.float64:
            fp64_batches.append(stack.shape[0])
        return plain(stack, config, ns_dtype, *args, **kwargs)

    monkeypatch.setattr(torch_backend, "orthogonalize", spy)
    torch.manual_seed(0)  # three weights, 32×16, 16×32, 32×16: one bucket of three 16×32 matrices
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 32))
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    assert [b.matrices for b in opt._buckets] == [3] and {b.backend.NAME for b in opt._buckets} == {"right"}
    assert fp64_batches == [2]  # the first and the last matrix
    [record] = json.loads(cache.read_text()).values()
    assert "band" in record["excluded"]["tail:default"]


def test_a_candidate_out_of_memory_is_excluded_and_nothing_is_persisted(monkeypatch, cache):
    """Running out of memory says what this process had free, not what the path can do: the other
    candidates still compete, the choice holds for this process, and the next one measures again."""
    fake = FakeDispatch(monkeypatch, {"big": 0.5, "small": 1.0})
    timer = fake.time

    def out_of_memory_for_big(option, run, device):
        if option.backend.NAME == "big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return timer(option, run, device)

    monkeypatch.setattr(measured, "time_candidate", out_of_memory_for_big)
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    assert {b.backend.NAME for b in opt._buckets} == {"small"}
    assert not cache.exists() or json.loads(cache.read_text()) == {}
    measured._MEMO.clear()
    fake.timed.clear()
    _step(mk.Muon(model.parameters(), ns_dtype=torch.float32), model)
    assert fake.timed == ["small:default"]  # measured again: nothing was read back


def test_gram_and_standard_compete_only_when_the_group_asked_auto(monkeypatch):
    fake = FakeDispatch(monkeypatch, {"x": 1.0, "y": 1.5})
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    assert not any(label.endswith(":gram") for label in fake.timed)
    assert all(b.config.algorithm == "standard" for b in opt._buckets)
    fake.timed.clear()
    other = _model()
    auto = mk.Muon(other.parameters(), ns_dtype=torch.float32, ns_algorithm="auto")
    _step(auto, other)
    assert any(label.endswith(":gram") for label in fake.timed)
    assert all(b.config.algorithm == "gram" and b.backend.NAME == "x" for b in auto._buckets)  # fake Gram: half
    assert all("auto (measured): Gram NS" in b.algorithm for b in auto._buckets)


def test_gram_is_not_a_candidate_where_bf16_gram_was_measured_outside_the_band(monkeypatch):
    """polar_express in bf16: the timing's band compares Gram with Gram, so it cannot exclude it;
    the candidate list does (recurrence.gram_outside_band)."""
    fake = FakeDispatch(monkeypatch, {"x": 1.0, "y": 1.5})
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.bfloat16, ns_algorithm="auto", ns_coefficients="polar_express")
    _step(opt, model)
    assert fake.timed and not any(label.endswith(":gram") for label in fake.timed)
    assert all(b.config.algorithm == "standard" for b in opt._buckets)


def test_plan_shows_the_times_and_the_choice(monkeypatch):
    FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    model = _model()
    text = str(mk.Muon(model.named_parameters(), ns_dtype=torch.float32).plan())
    row = next(line for line in text.splitlines() if line.startswith("0.weight"))
    assert " fast " in row and "auto (measured): fast:default 1 ms, slow:default 3 ms" in row


class _FakeGraph:
    """``graphs.capture``'s stand-in on a CPU: the captured function is called under a "capturing"
    flag (a stand-in backend may refuse it), and replay calls it again."""

    capturing = False

    def __init__(self, run):
        type(self).capturing = True
        try:
            run()
        finally:
            type(self).capturing = False
        self.run = run

    def replay(self):
        self.run()


def _graphed(params):
    """A Muon as if made with cuda_graph=True (which refuses CPU parameters): its step graph's own
    capture is a stand-in too (graphs.StepGraph, tests/test_step_graph.py)."""
    opt = mk.Muon(params, ns_dtype=torch.float32, capturable=True)
    opt._graph = graphs.StepGraph(capture_fn=_FakeGraph)
    return opt


def _replay_aware_timer(monkeypatch, eager: dict, replayed: dict, timed: list):
    def time(option, run, device):
        replay = isinstance(getattr(run, "__self__", None), _FakeGraph)
        timed.append((option.backend.NAME, replay))
        run()
        return (replayed if replay else eager)[option.backend.NAME]

    monkeypatch.setattr(measured, "time_candidate", time)


def test_a_graphed_step_times_graph_replays_and_keys_them_apart(monkeypatch, cache):
    """Under cuda_graph=True the step is replayed, so its candidates are timed as replays of a captured
    graph (two eager calls first: compiles and work buffers outside the capture): a path of many
    launches that loses eagerly may win there. Eager and replay timings are persisted under keys
    of their own, and plan() says which timing chose."""
    fake = FakeDispatch(monkeypatch, {"launchy": 0, "few": 0})
    monkeypatch.setattr(measured.graphs, "capture", _FakeGraph)
    calls, timed = [], []
    for name, backend in fake.backends.items():
        def counted(stack, config, ns_dtype, path=None, consume=False, name=name, inner=backend.orthogonalize):
            calls.append((name, _FakeGraph.capturing))
            return inner(stack, config, ns_dtype, path)

        backend.orthogonalize = counted
    _replay_aware_timer(monkeypatch, {"launchy": 2.0, "few": 1.0}, {"launchy": 0.5, "few": 1.0}, timed)
    model = _model()
    eager = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(eager, model)
    assert {b.backend.NAME for b in eager._buckets} == {"few"} and not any(replay for _, replay in timed)
    n = len(eager._buckets)
    timed.clear()
    calls.clear()
    graphed = _graphed(model.parameters())
    _step(graphed, model)
    assert {b.backend.NAME for b in graphed._buckets} == {"launchy"}
    assert sorted(timed) == sorted([("launchy", True), ("few", True)] * n)
    # Per candidate and bucket: the accuracy check, two eager calls, the capture, one replay whose
    # result is checked against the band, then the timer's replay (one, here); the step's own calls after.
    for name in ("launchy", "few"):
        mine = [capturing for who, capturing in calls if who == name]
        assert mine[:6 * n] == [False, False, False, True, False, False] * n and True not in mine[6 * n:]
    saved = json.loads(cache.read_text())
    assert len(saved) == 2 * n
    assert sorted(key.rsplit("|", 1)[1] for key in saved) == ["eager calls"] * n + ["graph replays"] * n
    assert {r["timed"]: r["choice"] for r in saved.values()} == {"eager calls": "few:default",
                                                                "graph replays": "launchy:default"}
    text = str(_graphed(model.named_parameters()).plan())
    row = next(line for line in text.splitlines() if line.startswith("0.weight"))
    assert "auto (measured, graph replays): launchy:default 0.5 ms, few:default 1 ms" in row


def _raises_under_capture(out):
    raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("misbehaves, why", [
    (_raises_under_capture, "RuntimeError: operation not permitted when stream is capturing"),
    (lambda out: out * 2, "replayed: error "),
], ids=["cannot-be-captured", "replays-otherwise"])
def test_a_path_that_misbehaves_under_capture_is_not_chosen_for_a_graphed_step(monkeypatch, cache, misbehaves, why):
    """A candidate whose call fails under capture would make the whole step's capture fail (every step
    eager from then on), and one that captures but computes otherwise when replayed (the band is
    checked on the replayed result too) would be wrong: either is excluded, with the reason, though
    it is the fastest."""
    fake = FakeDispatch(monkeypatch, {"bad": 0, "good": 0})
    monkeypatch.setattr(measured.graphs, "capture", _FakeGraph)
    inner = fake.backends["bad"].orthogonalize

    def bad(stack, config, ns_dtype, path=None, consume=False):
        out = inner(stack, config, ns_dtype, path)
        return misbehaves(out) if _FakeGraph.capturing else out

    fake.backends["bad"].orthogonalize = bad
    _replay_aware_timer(monkeypatch, {"bad": 1.0, "good": 2.0}, {"bad": 0.1, "good": 2.0}, [])
    model = _model()
    opt = _graphed(model.parameters())
    _step(opt, model)
    assert {b.backend.NAME for b in opt._buckets} == {"good"}
    for record in json.loads(cache.read_text()).values():
        assert set(record["ms"]) == {"good:default"}
        assert set(record["excluded"]) == {"bad:default"} and record["excluded"]["bad:default"].startswith(why)


def test_each_candidates_graph_is_released_before_the_next_is_captured(monkeypatch, cache):
    """A measurement graph's private memory pool cannot be freed during a later capture: each
    candidate's graph goes before the next candidate is captured, and none outlives the measurement."""
    import weakref

    FakeDispatch(monkeypatch, {"a": 0, "b": 0, "c": 0})
    live, seen = weakref.WeakSet(), []

    class Tracked(_FakeGraph):
        def __init__(self, run):
            seen.append(len(live))
            live.add(self)
            super().__init__(run)

    monkeypatch.setattr(measured.graphs, "capture", Tracked)
    _replay_aware_timer(monkeypatch, {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "c": 3.0}, [])
    model = _model()
    _step(_graphed(model.parameters()), model)
    assert len(seen) >= 3 and seen == [0] * len(seen) and len(live) == 0


def test_after_a_failed_capture_the_dispatch_is_timed_eagerly(monkeypatch, cache):
    """A graphed optimizer whose capture failed steps eagerly from then on: a plan it builds later is
    timed as eager calls, as its steps run."""
    FakeDispatch(monkeypatch, {"launchy": 0, "few": 0})
    monkeypatch.setattr(measured.graphs, "capture", _FakeGraph)
    timed = []
    _replay_aware_timer(monkeypatch, {"launchy": 2.0, "few": 1.0}, {"launchy": 0.5, "few": 1.0}, timed)
    model = _model()
    opt = _graphed(model.parameters())
    opt._graph.failed = True
    _step(opt, model)
    assert {b.backend.NAME for b in opt._buckets} == {"few"} and timed and not any(replay for _, replay in timed)
    assert all(key.endswith("|eager calls") for key in json.loads(cache.read_text()))


def test_nothing_is_timed_inside_a_capture(monkeypatch, cache):
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    monkeypatch.setattr(measured, "_capturing", lambda device: True)
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    assert fake.timed == [] and not cache.exists()
    assert {b.backend.NAME for b in opt._buckets} == {"torch"}  # the static table's choice


def test_a_cached_choice_is_used_inside_a_capture(monkeypatch):
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    model = _model()
    _step(mk.Muon(model.parameters(), ns_dtype=torch.float32), model)  # measured and saved
    fake.timed.clear()
    monkeypatch.setattr(measured, "_capturing", lambda device: True)
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    assert fake.timed == [] and {b.backend.NAME for b in opt._buckets} == {"fast"}


def test_table_mode_measures_nothing(monkeypatch, cache):
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32, dispatch="table")
    _step(opt, model)
    assert fake.timed == [] and {b.backend.NAME for b in opt._buckets} == {"torch"}
    monkeypatch.setenv(measured.ENV, "table")  # the environment overrides the argument
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    assert fake.timed == [] and not cache.exists()


def test_orthogonalize_measures_too(monkeypatch):
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    G = torch.randn(3, 8, 24, generator=torch.Generator().manual_seed(0))
    out = mk.orthogonalize(G, ns_dtype=torch.float32)
    assert sorted(fake.timed) == ["fast:default", "slow:default"]
    assert torch.equal(out, mk.orthogonalize(G, ns_dtype=torch.float32, backend="torch"))


def test_a_bad_dispatch_value_names_the_argument():
    with pytest.raises(ValueError, match="dispatch must be one of"):
        mk.Muon(_model().parameters(), dispatch="fastest")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        mk.orthogonalize(torch.randn(4, 4), dispatch="fastest")


def test_every_rank_takes_rank_0s_choice(tmp_path):
    """Rank 0 measures "fast" as fastest, rank 1 would measure "slow" as fastest (its own cache
    file): both step with rank 0's choice, and only rank 0 timed anything."""
    results = workers.spawn(tmp_path, "measured_dispatch", 2)
    assert results[0]["chosen"] == results[1]["chosen"] and set(results[0]["chosen"]) == {"fast"}
    assert results[0]["timed"] and not results[1]["timed"]
    for name in results[0]["params"]:
        assert torch.equal(results[0]["params"][name], results[1]["params"][name])


def test_ranks_stepping_alone_keep_the_table_unless_told_to_measure(tmp_path):
    """distributed="off" with two ranks: each steps its plain parameters on its own, so no rank can
    share its choice, and timings that disagree would give replicas different kernels. "auto" (the
    default) keeps the table on both and says why in plan(); "measure" measures on each rank — and
    here the ranks choose differently, which is the hazard "auto" avoids."""
    for res in workers.spawn(tmp_path, "measured_alone_auto", 2):
        assert res["timed"] == [] and set(res["chosen"]) == {"torch"}
        assert all("not measured: distributed='off' on 2 ranks" in why for why in res["why"])
    chosen = [res["chosen"] for res in workers.spawn(tmp_path, "measured_alone_measure", 2)]
    assert set(chosen[0]) == {"fast"} and set(chosen[1]) == {"slow"}


def test_rank_0s_choice_reaches_ranks_that_list_other_candidates(tmp_path):
    """Rank 1 lists ("other", "fast"), rank 0 ("fast", "slow"): the broadcast names rank 0's choice
    by its label, not by its place in rank 0's list (which named "other" on rank 1)."""
    results = workers.spawn(tmp_path, "measured_dispatch_other_candidates", 2)
    assert [set(res["chosen"]) for res in results] == [{"fast"}, {"fast"}]
    assert results[0]["timed"] and not results[1]["timed"]


def test_a_failed_measurement_keeps_the_table_with_a_warning(monkeypatch, cache):
    FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})

    def broken(*args):
        raise RuntimeError("no events on this device")

    monkeypatch.setattr(measured, "measure", broken)
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    with pytest.warns(UserWarning, match="using the static dispatch table"):
        _step(opt, model)
    assert {b.backend.NAME for b in opt._buckets} == {"torch"} and not cache.exists()


def test_an_unwritable_cache_costs_a_warning_not_the_step(monkeypatch, tmp_path):
    FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv(measured.CACHE_ENV, str(blocked / "dispatch.json"))  # a path under a file
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    with pytest.warns(UserWarning, match="could not write the dispatch cache"):
        _step(opt, model)
    assert {b.backend.NAME for b in opt._buckets} == {"fast"}


def test_the_measured_batch_is_a_ranks_share_under_ddp():
    """Two ranks owning 2 and 1 of 3 matrices time a call of 2 (the largest share), not 3."""
    model = _model()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    _step(opt, model)
    bucket = opt._buckets[0]
    entries = bucket.entries
    bucket.entries = [entries[0]] * 3  # three matrices of one shape
    assert measured._batch(bucket, None) == 3
    assert measured._batch(bucket, None, owners=[0, 0, 1]) == 2
    bucket.entries = entries


def _bad_records(saved: dict, kind: str) -> str:
    """The text of a cache file whose records (under the keys a step reads) are malformed as ``kind`` says."""
    bad = {"string": lambda r: "fast:default", "no ms": lambda r: {"choice": r["choice"]},
           "no choice": lambda r: {"ms": r["ms"]}, "ms not numbers": lambda r: {**r, "ms": {"fast:default": "1"}}}
    return json.dumps({key: bad[kind](record) for key, record in saved.items()})


@pytest.mark.parametrize("kind", ["truncated", "a list", "string", "no ms", "no choice", "ms not numbers"])
def test_a_malformed_cache_file_costs_one_warning_and_is_measured_again(monkeypatch, cache, kind):
    fake = FakeDispatch(monkeypatch, {"slow": 3.0, "fast": 1.0})
    model = _model()
    _step(mk.Muon(model.parameters(), ns_dtype=torch.float32), model)
    saved = json.loads(cache.read_text())
    cache.write_text({"truncated": cache.read_text()[:20], "a list": "[]"}.get(kind) or _bad_records(saved, kind))
    measured._MEMO.clear()  # a new process
    fake.timed.clear()
    opt = mk.Muon(model.parameters(), ns_dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(opt, model)
    ignored = "the content (not a JSON object)" if kind in ("truncated", "a list") else f"{len(saved)} malformed entries"
    assert [str(w.message) for w in caught if "cache file" in str(w.message)] == [
        f"muon_kernels: ignoring {ignored} of the cache file {cache}; the next write replaces it"]
    assert fake.timed and {b.backend.NAME for b in opt._buckets} == {"fast"}
    assert json.loads(cache.read_text()) == saved  # rewritten with the new measurements alone


def _write_entries(rank: int, start) -> None:
    os.getpid = lambda: 42  # containers on nodes sharing an NFS home: every writer has the same pid
    start.wait()
    for i in range(25):
        measured._store(f"rank{rank}-key{i}", {"choice": "torch:default", "ms": {"torch:default": 1.0}, "excluded": {}})


def test_concurrent_writers_keep_each_others_entries(cache):
    """Each write re-reads and merges under a file lock, through a temp file of its own."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(4)
    writers = [context.Process(target=_write_entries, args=(rank, start)) for rank in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
    assert [w.exitcode for w in writers] == [0] * 4
    assert set(json.loads(cache.read_text())) == {f"rank{r}-key{i}" for r in range(4) for i in range(25)}
    assert sorted(p.name for p in cache.parent.iterdir()) == ["dispatch.json", "dispatch.json.lock"]  # no temp file


def test_a_failed_write_leaves_the_file_and_no_temp_file(monkeypatch, cache):
    measured._store("kept", {"choice": "torch:default", "ms": {"torch:default": 1.0}, "excluded": {}})
    before = cache.read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    with pytest.warns(UserWarning, match="could not write the dispatch cache"):
        measured._store("lost", {"choice": "torch:default", "ms": {"torch:default": 1.0}, "excluded": {}})
    assert cache.read_text() == before
    assert sorted(p.name for p in cache.parent.iterdir()) == ["dispatch.json", "dispatch.json.lock"]


def test_a_lock_held_too_long_costs_one_warning_and_the_write_still_lands(monkeypatch, cache):
    """A writer stopped while holding the lock (a SIGSTOPped rank) must not hang every other rank's
    step: after LOCK_WAIT_S the write goes ahead unlocked, with one warning per file."""
    import fcntl

    from muon_kernels import cache_file

    monkeypatch.setattr(cache_file, "LOCK_WAIT_S", 0.2)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_name(cache.name + ".lock"), "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: flock excludes it too
        with pytest.warns(UserWarning, match="could not lock .*still held by another writer"):
            measured._store("a", {"choice": "torch:default", "ms": {"torch:default": 1.0}, "excluded": {}})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per file
            measured._store("b", {"choice": "torch:default", "ms": {"torch:default": 1.0}, "excluded": {}})
    assert set(json.loads(cache.read_text())) == {"a", "b"}


def test_the_cache_file_takes_the_umask_mode(cache):
    import stat

    from muon_kernels import cache_file

    measured._store("a", {"choice": "torch:default", "ms": {"torch:default": 1.0}, "excluded": {}})
    assert stat.S_IMODE(cache.stat().st_mode) == 0o666 & ~cache_file._umask()
