"""Runs tests/interpreter/ in child processes with TRITON_INTERPRET=1 set before triton loads.

The children use this test run's interpreter, so `make test` covers every Triton version it runs
the suite under (the newest and the GPU machine's 3.6). One child per file: the interpreter is
the suite's slowest part, and per-file tests let pytest-xdist spread it over the cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FILES = sorted(p.name for p in (TESTS / "interpreter").glob("test_*.py"))


def test_the_interpreter_suite_is_all_collected():
    assert len(FILES) >= 16, FILES


@pytest.mark.parametrize("name", FILES)
def test_triton_kernels_on_the_cpu_interpreter(name):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"interpreter/{name}"],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=1800)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # Every test of the file ran: none skipped (a kernel the installed Triton cannot interpret is a failure).
    assert re.search(r"\b[1-9]\d* passed", summary) and not re.search(r"skipped|deselected|xfail", summary), summary
