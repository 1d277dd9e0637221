"""Shared fixtures, and a progress log for runs that may be cut off."""

import os

import pytest
import torch

# ``make gpu-check`` (bench/gpu_check.py) gives the GPU tests a share of a hard time budget: a run
# stopped at its end writes no junit XML and no failure report, so each outcome is appended to
# this file as the test ends (one line: outcome, node id, seconds, the failure's message or the
# skip's reason).
PROGRESS_ENV = "MUON_KERNELS_TEST_PROGRESS"


def pytest_runtest_logreport(report):
    path = os.environ.get(PROGRESS_ENV)
    if not path or (report.when != "call" and not (report.failed or report.skipped)):
        return
    outcome = "error" if report.failed and report.when != "call" else report.outcome
    detail = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)  # the exception's own message, where pytest has it
        detail = (crash.message if crash is not None else str(report.longrepr)).strip()
        detail = " ".join(detail.split())[:300]
    elif report.skipped and isinstance(report.longrepr, tuple):
        detail = str(report.longrepr[2])[:300]
    with open(path, "a") as f:
        f.write(f"{outcome}\t{report.nodeid}\t{report.duration:.2f}\t{detail}\n")


# The suite's longest tests (a minute or more each on a 2-core CPU), longest first. pytest-xdist hands
# tests to its workers in collection order (make test: one at a time, --maxschedchunk 1); these,
# collected last alphabetically, kept one worker busy for minutes after the other had finished.
# Started first, they overlap the many short tests. The AOT compiles lead: with a cold Triton cache
# (a fresh CI machine) each arch takes 1–3.5 minutes; the two longest single tests of the last clean
# run (sm_90's, which also compiles the persistent and TMA variants, ~160 s; the interpreter's
# children with three cold torch.compile runs, ~90 s, and with most kernel tests, ~60 s) go first of all.
LONGEST_FIRST = ("test_triton_aot.py::test_kernels_compile_use_tensor_cores_fit_and_do_not_spill[90]",
                 "test_triton_interpreter.py::test_triton_kernels_on_the_cpu_interpreter[test_compiled_step_triton.py]",
                 "test_triton_interpreter.py::test_triton_kernels_on_the_cpu_interpreter[test_triton_kernels.py]",
                 "test_triton_aot.py", "test_triton_interpreter.py", "test_bench.py::test_accuracy_script",
                 "test_tune.py", "test_bench.py::test_benchmark_writes_results", "test_convergence.py")


def _longest_first(item) -> int:
    where = f"{item.path.name}::{item.name}"
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if where.startswith(prefix)), len(LONGEST_FIRST))


def pytest_configure(config):
    """Under pytest-xdist each worker (and every process it starts: bench scripts, interpreter
    children, distributed ranks) computes on its share of the cores. With torch's default of one
    thread per core in every worker, two heavy tests side by side oversubscribed the cores: OpenMP's
    spinning threads made a 25-s test take 330 s in one clean run on 2 cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if hasattr(config, "workerinput") and workers:
        threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (every worker sorts alike); one process keeps file order
        items.sort(key=_longest_first)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def dispatch_cache(tmp_path, monkeypatch):
    """backend="auto"'s measured choices go to a fresh file, and the environment forces no mode."""
    from muon_kernels.backends import measured

    path = tmp_path / "dispatch.json"
    monkeypatch.setenv(measured.CACHE_ENV, str(path))
    monkeypatch.delenv(measured.ENV, raising=False)
    monkeypatch.setattr(measured, "_MEMO", {})  # nothing this process measured in an earlier test
    return path
