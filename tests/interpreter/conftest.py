"""Tests of the Triton kernels on the CPU interpreter.

They run only in a process started with TRITON_INTERPRET=1 (the flag must be set before the
kernels are defined); tests/test_triton_interpreter.py starts that process, once per Triton version.
"""

import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/oracles.py
