"""Dispatch structure: one backend call per bucket, chunking, plan cache, plan(), backends, compile."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import muon_kernels as mk
from muon_kernels.backends import torch_backend


@pytest.fixture
def calls(monkeypatch):
    seen = []
    original = torch_backend.orthogonalize

    def counting(stack, config, ns_dtype, path=None, consume=False):
        seen.append(tuple(stack.shape))
        return original(stack, config, ns_dtype, consume=consume)

    monkeypatch.setattr(torch_backend, "orthogonalize", counting)
    return seen


def _gpt_block(d=32, layers=3):
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    return nn.Sequential(*blocks)


def _fill_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_one_backend_call_per_bucket(calls):
    model = _gpt_block()
    opt = mk.Muon(model.parameters())
    _fill_grads(model)
    opt.step()
    # Oriented shapes: (32, 96) ×3, (32, 32) ×3, (32, 128) ×6 (up and down projections share it).
    assert sorted(calls) == [(3, 32, 32), (3, 32, 96), (6, 32, 128)]
    calls.clear()
    _fill_grads(model, seed=1)
    opt.step()
    assert len(calls) == 3


def test_workspace_cap_chunks_buckets_with_identical_results(calls):
    model = _gpt_block()
    reference = _gpt_block()
    reference.load_state_dict(model.state_dict())
    per_matrix = 4 * 32 * 128 + 2 * (2 * 32 * 128 + 2 * 32 * 32)
    capped = mk.Muon(model.parameters(), max_workspace_bytes=2 * per_matrix)
    free = mk.Muon(reference.parameters(), max_workspace_bytes=None)
    for seed in range(3):
        _fill_grads(model, seed)
        _fill_grads(reference, seed)
        calls.clear()
        capped.step()
        assert sorted(calls).count((2, 32, 128)) == 3
        free.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("setting", [
    {"momentum_form": "sgd"}, {"nesterov": False}, {"adaptive": "normuon"},
    {"constraint": "hyperball", "weight_decay": 0.0}, {"weight_decay_mode": "cautious"},
    {"momentum_dtype": "int8"}, {"momentum_dtype": torch.bfloat16, "momentum_rounding": "stochastic"},
    {"ns_dtype": torch.float32}, {"ns_coefficients": "quintic"}, {"ns_algorithm": "gram"},
], ids=lambda setting: ",".join(setting))
def test_groups_that_differ_in_a_per_bucket_setting_are_stepped_apart(setting):
    """A bucket runs one momentum form, recurrence, variant and momentum precision for all its matrices:
    two groups of the same shapes that differ in one of them get a bucket each, and each steps exactly
    as in an optimizer of its own."""
    def make():
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(24, 40) * 0.1) for _ in range(4)]

    both, alone = make(), make()
    opt = mk.Muon([{"params": both[:2]}, {"params": both[2:], **setting}], backend="torch")
    # (the second group stays group 1 behind an empty one: stochastic rounding draws per group index)
    apart = [mk.Muon([{"params": alone[:2]}], backend="torch"),
             mk.Muon([{"params": []}, {"params": alone[2:], **setting}], backend="torch")]
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for p, q in zip(both, alone):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        for o in apart:
            o.step()
    assert len(opt._buckets) == 2
    for p, q in zip(both, alone):
        assert torch.equal(p, q)


def test_plan_cache_follows_changing_gradients(calls):
    model = _gpt_block(layers=2)
    opt = mk.Muon(model.parameters())
    _fill_grads(model)
    opt.step()
    calls.clear()
    model[0].weight.grad = None
    model[4].weight.grad = None
    opt.step()
    assert sorted(calls) == [(2, 32, 32), (4, 32, 128)]  # the (32, 96) bucket has no gradients
    calls.clear()
    opt.param_groups[0]["ns_steps"] = 2
    _fill_grads(model)
    opt.step()
    assert sorted(calls) == [(2, 32, 32), (2, 32, 96), (4, 32, 128)]


def test_plan_text_and_available_backends():
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 16))
    opt = mk.Muon(model.named_parameters(), ns_dtype=torch.float16)
    text = str(opt.plan())
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "dtype", "device", "method", "view", "backend", "path", "rank", "why"]
    assert any("0.weight" in l and "Muon" in l and "torch" in l and "baddbmm" in l and "float16" in l for l in lines)
    assert any("1.weight" in l and "AdamW" in l and "ndim 1 < 2" in l for l in lines)
    backends = mk.available_backends()
    assert set(backends) == {"torch", "triton", "cuda"}
    assert backends["torch"][0] is True
    if not torch.cuda.is_available():
        assert backends["triton"] == (False, "no CUDA device (torch.cuda.is_available() is False)")
        assert backends["cuda"][0] is False and backends["cuda"][1]


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    eager_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    compiled_model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = mk.Muon(eager_model.parameters(), lr=0.02, ns_dtype=torch.float32)
    compiled = mk.Muon(compiled_model.parameters(), lr=0.02, ns_dtype=torch.float32)
    step = torch.compile(compiled.step)
    for seed in range(3):
        _fill_grads(eager_model, seed)
        _fill_grads(compiled_model, seed)
        eager.step()
        step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"constraint": "hyperball"}, {"adaptive": "normuon", "constraint": "hyperball"}])
def test_compiled_step_with_first_steps_after_a_graph_break_matches_eager(options):
    """A matrix's first hyperball step reads its norms on the host (a graph break under
    torch.compile). Dynamo drops attribute writes made on an optimizer in a compiled frame, so a
    plan stored on ``self`` and read back after the break was stale: the whole Muon half of every
    step in which a matrix stepped for the first time was skipped. Here the second layer gets its
    first gradient at the second step, and a third matrix joins by add_param_group at the third."""
    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False))
        late = nn.Parameter(torch.randn(8, 8))
        opt = mk.Muon(model.parameters(), lr=0.02, ns_dtype=torch.float32, weight_decay=0.0, **options)
        step = torch.compile(opt.step) if compiled else opt.step
        for i in range(4):
            if i == 2:
                opt.add_param_group({"params": [late], "use_muon": True})
            gen = torch.Generator().manual_seed(i)
            for j, p in enumerate([*model.parameters(), late]):
                p.grad = None if (j == 1 and i == 0) or (j == 2 and i < 2) else torch.randn(p.shape, generator=gen)
            step()
        return [p.detach().clone() for p in (*model.parameters(), late)]

    for eager, compiled in zip(run(False), run(True)):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- import graph
REPO = Path(__file__).resolve().parent.parent
# Source folders of the installed package (setup.py's package_dir: triton_kernels/ is installed
# as muon_kernels.triton_kernels).
PACKAGE_DIRS = {"muon_kernels": REPO / "muon_kernels", "muon_kernels.triton_kernels": REPO / "triton_kernels"}
EXTENSIONS = ("muon_kernels._C",)  # compiled: imports nothing of the package


def _modules() -> dict[str, Path | None]:
    modules: dict[str, Path | None] = dict.fromkeys(EXTENSIONS)
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that ``name`` imports anywhere in its source — at the top, inside
    functions, or under ``if TYPE_CHECKING`` — as the import statement names it: ``from . import x``
    imports the submodule x, ``from .x import y`` imports x (or x.y where that is a module)."""
    if path is None:
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_the_import_graph_has_no_cycle():
    """Modules import one way only (optimizer → plan → backends → kernels, all of them → the leaf
    bucket/ns_config types): no module imports one that imports it back, type-only imports included."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # The leaves import no muon_kernels module but the environment switches and the number check,
    # which import none.
    roots = {"muon_kernels.environment", "muon_kernels.real_number"}
    leaves = {"muon_kernels.ns_config", "muon_kernels.workspace", *roots}
    assert all({m for m in graph[leaf] if m.startswith("muon_kernels")} <= roots for leaf in leaves)
    assert not {m for root in roots for m in graph[root] if m.startswith("muon_kernels")}
    assert "muon_kernels.bucket" in graph and graph["muon_kernels.bucket"] <= leaves
    assert graph["muon_kernels.backends.torch_backend"] >= {"muon_kernels.bucket"}  # the walk sees imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_type_only_cycle(tmp_path):
    """The walk counts imports under ``if TYPE_CHECKING`` and inside functions."""
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    modules = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}}
    assert _cycles(graph) == [["p.a", "p.b"]]


# ---------------------------------------------------------------- code Dynamo must trace
def _comprehensions_in_try(source: str) -> list[int]:
    """Lines of list/set/dict comprehensions inside a ``try`` body (Python 3.12 inlines them, PEP 709)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Try):
            lines += [n.lineno for b in node.body for n in ast.walk(b)
                      if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp))]
    return lines


def test_no_comprehension_inside_a_try_in_the_package():
    """The GPU machine runs Python 3.12 with torch 2.11, whose Dynamo could not resume a compiled step
    after a graph break at a list comprehension inside a ``try`` (variants.radius_vector: a
    hyperball step under torch.compile failed with InternalTorchDynamoError: KeyError). The suite
    runs on 3.11 and a newer torch, which do not fail, so the shape itself is refused here; a
    comprehension goes in a helper or a loop outside the ``try``."""
    assert _comprehensions_in_try("try:\n    x = [i for i in y]\nexcept E:\n    pass\n") == [2]  # the walk sees one
    found = {str(path.relative_to(REPO)): lines for path in _modules().values() if path is not None
             for lines in [_comprehensions_in_try(path.read_text())] if lines}
    assert found == {}
