"""The JSON files that keep choices across processes: the measured dispatch (backends/measured.py)
and the opt-in kernel autotuning (triton_kernels/autotune.py).

Several processes may write one file at once (the ranks of a job, or jobs in containers on several
nodes sharing an NFS home, where process ids repeat): each write re-reads the file and merges its
entries under a lock, then replaces the file atomically, so no writer drops another's keys and a
reader sees the old file or the new one. A file damaged by hand or written by another version of
the package loses only its bad entries, with one warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

# Threads of one process hold this as well as the file lock: it also orders them where the file
# system has no locks.
_THREADS = threading.Lock()
_WARNED: set[str] = set()  # files whose bad entries were reported: once per file and process


def read(path: Path, valid: Callable[[object], bool]) -> dict:
    """The entries of the JSON object in ``path`` that ``valid`` accepts. No file, or one this
    process cannot read, holds nothing; anything else ignored costs a warning (the next write
    rewrites the file without it)."""
    try:
        data = json.loads(path.read_text())
    except OSError:
        return {}
    except ValueError:  # truncated, or not JSON
        data = None
    entries = {key: value for key, value in data.items() if valid(value)} if isinstance(data, dict) else {}
    if (not isinstance(data, dict) or len(entries) < len(data)) and str(path) not in _WARNED:
        _WARNED.add(str(path))
        bad = (f"{len(data) - len(entries)} malformed entries of" if isinstance(data, dict)
               else "the content (not a JSON object) of")
        warnings.warn(f"muon_kernels: ignoring {bad} the cache file {path}; the next write replaces it", stacklevel=3)
    return entries


def update(path: Path, entries: dict, valid: Callable[[object], bool]) -> None:
    """Merge ``entries`` into the file (see the module docstring); raises OSError (or another error
    of the file system) when it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREADS, _locked(path):
        data = read(path, valid)
        data.update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o644)  # write_text's mode under the usual umask (mkstemp's is 0600)
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive flock on the sidecar ``<path>.lock`` (the data file itself is replaced by each
    write, so a lock on it would lock the old file). Where there is none to take (a file system
    without locks, a platform without fcntl), the write goes ahead unlocked: still atomic, but a
    concurrent writer's new entries may be lost."""
    with contextlib.ExitStack() as held:
        try:
            import fcntl

            lock = held.enter_context(open(path.with_name(f"{path.name}.lock"), "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except (ImportError, OSError):
            pass
        yield
