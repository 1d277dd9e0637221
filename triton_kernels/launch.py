"""Launching this package's Triton kernels without Triton's per-call dispatch.

``kernel[grid](*args, **constexprs)`` runs Triton's ``JITFunction.run`` on every call: it binds
and specializes each argument (dtype, 16-byte alignment, int value classes: 39 arguments for the
symmetric kernel), builds and hashes a cache key, checks the kernel's globals, and only then calls
the compiled kernel's C launcher. On this project's 2-core CPU machine that Python costs 5–12 µs
per launch under Triton 3.6 and 3.9 alike (``bench/launch_overhead.py``; bench/README.md "Host
time of a launch"), and a batch-1 Newton–Schulz at 1024×4096 makes 17 launches whose kernels run
for a few to ~25 µs each: the host, not the GPU, sets its pace.

``launch(kernel, grid, *args, **constexprs)`` makes the same launch under a cheaper key of its
own, at least as fine as Triton's specialization: the argument types; every int, bool, str and
None by value; every tensor by (dtype, data_ptr mod 16); floats' values left out (Triton passes
them as fp32 and never specializes on them); constexprs and options by name, value and type; and
the current device as Triton's driver reports it. The first call with a key goes through
``kernel[grid]`` — Triton compiles, caches and launches as usual, and hands back its
``CompiledKernel`` — and later calls call that compiled kernel's own launcher
(``CompiledKernel[grid](*args)``, the call ``JITFunction.run`` ends with: same stream, hooks and
launch metadata): 4–6 µs of Python instead of 5–12. ``tests/test_launch.py`` checks both claims
against the installed Triton on a CPU, for every launch a step makes: the key refines Triton's own
binder's specialization, and the direct call hands the launcher exactly what Triton's does.

Falls back to ``kernel[grid]`` on every call under the interpreter, for a kernel with pre-run
hooks, for an argument of another type (a TMA descriptor), and with
``MUON_KERNELS_DIRECT_LAUNCH=0``. What ``JITFunction.run`` reads on every call and this key does
not is read when a key's entry is made: Triton's compile knobs (``TRITON_DEBUG``, instrumentation,
Triton 3.9's fpsan casts and stage-inspection hook) and its check that the module globals a kernel
reads have not changed since it was compiled (this package never changes them). Set such knobs
before the first step, or call ``clear()``.
"""

from __future__ import annotations

import operator
import os

import torch

from triton.compiler import CompiledKernel
from triton.runtime.driver import driver

from ..environment import Toggle
from .config import is_interpreting

ENV = "MUON_KERNELS_DIRECT_LAUNCH"
# Entries per call site: a training run launches each kernel with a handful of shapes; a program that
# keeps making new ones (new shapes every call) stops adding entries and pays Triton's dispatch.
MAX_ENTRIES = 4096

_DIRECT = Toggle(os.environ.get(ENV, "1") != "0")
# Called with (compiled kernel, grid, args, constexpr tail) of every direct launch, and with None for
# a launch through Triton's dispatch (triton_kernels.replay records a call's launches).
observers: list = []
# Called by ``clear`` (triton_kernels.replay forgets its recordings).
on_clear: list = []
_KEYED = (torch.Tensor, int, float, bool, str, type(None))


class _Site:
    """One kernel launched with one sequence of argument types: where its tensors and its keyed
    scalars sit (C-level getters), and its entries {key: (CompiledKernel, constexpr tail)}."""

    __slots__ = ("tensors", "scalars", "entries")

    def __init__(self, types: tuple[type, ...]):
        self.tensors = _getter([i for i, t in enumerate(types) if issubclass(t, torch.Tensor)])
        self.scalars = _getter([i for i, t in enumerate(types) if not issubclass(t, (torch.Tensor, float))])
        self.entries: dict = {}


def _getter(positions: list[int]):
    """args -> tuple of args[i] for i in positions (itemgetter returns a bare item for one index)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


# (id(kernel), argument types) -> _Site. By id: hashing a JITFunction takes a lock and reads its
# source hash; every kernel launched here is a module global, never freed.
_sites: dict[tuple, _Site] = {}


def launch(kernel, grid: tuple[int, ...], *args, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)``, through the compiled kernel directly when this
    argument class has been launched before. ``args``: every non-constexpr parameter, in order;
    ``constexprs``: the constexpr parameters and Triton's options (num_warps, num_stages, ...)."""
    if not _DIRECT.on or is_interpreting() or getattr(kernel, "pre_run_hooks", True):
        _dispatch(kernel, grid, args, constexprs)
        return
    grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    types = tuple(map(type, args))
    site = _sites.get((id(kernel), types))
    if site is None:
        if not all(issubclass(t, _KEYED) for t in types):  # a TMA descriptor: Triton's dispatch every time
            _dispatch(kernel, grid, args, constexprs)
            return
        site = _sites.setdefault((id(kernel), types), _Site(types))
    key = _key(site, args, constexprs)
    hit = site.entries.get(key)
    if hit is not None:
        compiled, tail = hit
        compiled[grid](*args, *tail)
        for observe in observers:
            observe((compiled, grid, args, tail))
        return
    compiled = _dispatch(kernel, grid, args, constexprs)
    if hasattr(compiled, "result"):  # Triton's async compile mode (3.6 on) hands back a FutureKernel
        compiled = compiled.result()
    # None: a jit_cache_hook (or a warm-up) skipped the launch; nothing to call directly next time.
    if isinstance(compiled, CompiledKernel) and len(site.entries) < MAX_ENTRIES:
        site.entries[key] = (compiled, constexpr_tail(kernel, len(args), constexprs))


def _dispatch(kernel, grid, args: tuple, constexprs: dict):
    """Triton's own launch path (binding, cache lookup, compile on a miss), reported as such."""
    compiled = kernel[grid](*args, **constexprs)
    for observe in observers:
        observe(None)
    return compiled


def _key(site: _Site, args: tuple, constexprs: dict) -> tuple:
    """Device, keyed scalars by value, tensors by (dtype, address mod 16), constexprs and options
    by value and type; with the site's argument types, at least as fine as Triton's specialization."""
    return (driver.active.get_current_device(), site.scalars(args),
            tuple([(t.dtype, t.data_ptr() & 15) for t in site.tensors(args)]),
            tuple(constexprs.items()), tuple(map(type, constexprs.values())))


def key_of(args: tuple, constexprs: dict) -> tuple:
    """The whole key a launch with these arguments is filed under: argument types, then ``_key``."""
    types = tuple(map(type, args))
    return types, _key(_Site(types), args, constexprs)


def constexpr_tail(kernel, given: int, constexprs: dict) -> tuple:
    """The values of the parameters after the ``given`` positional ones, in signature order, as
    ``JITFunction.run`` passes them to the compiled kernel (its bound arguments, defaults applied)."""
    tail = []
    for param in kernel.params[given:]:
        if param.name in constexprs:
            tail.append(constexprs[param.name])
        else:
            default = kernel.signature.parameters[param.name].default
            if default is kernel.signature.parameters[param.name].empty:
                raise TypeError(f"{kernel.__name__}: parameter {param.name} was not given")
            tail.append(default)
    return tuple(tail)


def clear() -> None:
    """Forget every entry: the next launch of each key goes through Triton's dispatch again (and,
    through ``on_clear``, every recorded call: a recording holds compiled kernels)."""
    _sites.clear()
    for forget in on_clear:
        forget()


def direct() -> bool:
    """Whether launches take the direct path now."""
    return _DIRECT.on


def entries(kernel) -> int:
    """How many argument classes of ``kernel`` launch directly (tests and benchmarks)."""
    return sum(len(site.entries) for (k, _), site in _sites.items() if k == id(kernel))


def direct_launches(enabled: bool):
    """Direct launches on or off inside the block (benchmarks time both in one process)."""
    return _DIRECT.set(enabled)
