"""Runs tests/interpreter/ in a child process with TRITON_INTERPRET=1 set before triton loads.

The child uses this test run's interpreter, so `make test` covers every Triton version it runs
the suite under (the newest and the GPU machine's 3.6).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_triton_kernels_on_the_cpu_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "interpreter"],
                         cwd=TESTS, env=env, capture_output=True, text=True, timeout=1800)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 40 and "skipped" not in summary, summary
