"""The JSON files that keep choices across processes: the measured dispatch (backends/measured.py)
and the opt-in kernel autotuning (triton_kernels/autotune.py).

Several processes may write one file at once (the ranks of a job, or jobs in containers on several
nodes sharing an NFS home, where process ids repeat): each write re-reads the file and merges its
entries under a lock, then replaces the file atomically, so no writer drops another's keys and a
reader sees the old file or the new one. A file damaged by hand or written by another version of
the package loses only its bad entries, with one warning.

Where the files live: the path in the file's environment variable, else ``$XDG_CACHE_HOME/muon_kernels``,
else ``~/.cache/muon_kernels``; a process with no home directory (a container's arbitrary user with
no ``HOME`` and no passwd entry) keeps its choices in memory, with one warning per file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from .version import __version__

# Threads of one process hold this as well as the file lock: it also orders them where the file
# system has no locks.
_THREADS = threading.Lock()
_WARNED: set[str] = set()  # files whose bad entries (or lock) were reported: once per file and process


def _umask() -> int:
    """This process's umask, read where the kernel shows it (setting it to read it back would change
    it for a moment under every other thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what a plain open() gives a new file (mkstemp's is 0600)
LOCK_WAIT_S = 30.0  # a writer stopped while holding the lock holds up the others this long at most


def location(env: str, name: str) -> Path | None:
    """Where the cache file ``name`` lives (module docstring); None where there is no home directory
    to put it in and ``env`` is not set."""
    if os.environ.get(env):
        return Path(os.environ[env])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / "muon_kernels" / name
    try:
        return Path.home() / ".cache" / "muon_kernels" / name
    except RuntimeError:  # neither HOME nor a passwd entry for this user
        if f"home:{name}" not in _WARNED:
            _WARNED.add(f"home:{name}")
            warnings.warn(f"muon_kernels: no home directory to keep {name} in; the choices it would hold last "
                          f"for this process only (set {env} or XDG_CACHE_HOME to a writable path)", stacklevel=3)
        return None


@functools.cache
def code_version() -> str:
    """This installation's version and a digest of its code, for the cache keys: a choice measured
    with other kernels (an upgrade, or a development install rebuilt at the same version) is
    measured again. Read once per process."""
    return f"{__version__}+{code_digest(Path(__file__).resolve().parent)}"


def code_digest(root: Path) -> str:
    """A digest of every module and compiled extension under ``root``: names and contents (~1 ms
    per MB); bytecode and data files do not count."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(p for pattern in ("*.py", "*.so", "*.pyd") for p in root.rglob(pattern)):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read(path: Path | None, valid: Callable[[object], bool]) -> dict:
    """The entries of the JSON object in ``path`` that ``valid`` accepts. No file, or one this
    process cannot read, holds nothing; anything else ignored costs a warning (the next write
    rewrites the file without it)."""
    if path is None:
        return {}
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


def update(path: Path | None, entries: dict, valid: Callable[[object], bool]) -> None:
    """Merge ``entries`` into the file (see the module docstring); raises OSError (or another error
    of the file system) when it cannot be written. No path (no home directory): nothing is written,
    location() warned."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREADS, _locked(path):
        data = read(path, valid)
        data.update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                with contextlib.suppress(OSError, AttributeError):  # no fchmod (Windows), or a file system refusing it
                    os.fchmod(f.fileno(), _FILE_MODE)
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive flock on the sidecar ``<path>.lock`` (the data file itself is replaced by each
    write, so a lock on it would lock the old file), waited for at most LOCK_WAIT_S. Where there is
    none to take (a lock file this user may not open, a file system without locks, a platform
    without fcntl, a holder that does not let go) the write goes ahead unlocked — still atomic, but
    a concurrent writer's new entries may be lost — with one warning per file."""
    with contextlib.ExitStack() as held:
        try:
            import fcntl

            lock = held.enter_context(open(path.with_name(f"{path.name}.lock"), "a"))
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise OSError(f"still held by another writer after {LOCK_WAIT_S:.0f} s") from None
                    time.sleep(0.01)
        except (ImportError, OSError) as exc:
            if f"lock:{path}" not in _WARNED:
                _WARNED.add(f"lock:{path}")
                warnings.warn(f"muon_kernels: could not lock {path} ({exc!r}); writing it unlocked, so entries "
                              "another process writes at the same moment may be lost", stacklevel=4)
        yield
