"""The package's environment switches, read on every use at the cost of a dictionary lookup, and
the process-wide toggles benchmarks flip for a block.

Some switches are read on every call so that a test or a user can flip them between calls
(``MUON_KERNELS_DEBUG_FILL`` per work buffer, ``MUON_KERNELS_AUTOTUNE`` per product launch): ~30
reads per Newton–Schulz call. ``os.environ.get`` encodes its key and goes through the Mapping
protocol on each of them (~0.5 µs on the development CPU, ~17 µs per call, 8% of a batch-1
1024×4096 call's host time). ``Switch.get`` looks the pre-encoded key up in the mapping's own
storage and decodes the value only when it changed, so it sees exactly what ``os.environ.get``
sees (``os.environ[...] = ``, ``del``, pytest's ``monkeypatch.setenv``; like it, not a bare
``os.putenv``).
"""

from __future__ import annotations

import contextlib
import os


class Switch:
    """One environment variable; ``get()`` is ``os.environ.get(name, "")``."""

    __slots__ = ("name", "_key", "_raw", "_value")

    def __init__(self, name: str):
        self.name = name
        self._key = self._raw = self._value = None

    def get(self) -> str:
        env = os.environ
        storage = getattr(env, "_data", None)  # CPython's os._Environ: encoded keys -> encoded values
        if storage is None or not hasattr(env, "encodekey"):  # another mapping put in os.environ's place
            return env.get(self.name, "")
        if self._key is None:
            self._key = env.encodekey(self.name)
        raw = storage.get(self._key)
        if raw is None:
            return ""
        if raw is not self._raw:  # a value that was set again is a new object: decode it once
            self._value, self._raw = env.decodevalue(raw), raw
        return self._value


class Toggle:
    """A process-wide on/off (``on``) that benchmarks and tests flip for a block: ``with t.set(False):``."""

    __slots__ = ("on",)

    def __init__(self, on: bool):
        self.on = on

    @contextlib.contextmanager
    def set(self, on: bool):
        before, self.on = self.on, on
        try:
            yield
        finally:
            self.on = before
