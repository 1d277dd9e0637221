"""Backend registry: which implementations exist, which can run here, and why not.

A backend is a module with ``NAME``, ``kernel_path(m, n, ns_dtype, device) -> (path, why)``,
``momentum_stack(bucket, grads, bufs, groups)``, ``apply_update(bucket, ortho, groups)`` and
``orthogonalize(stack, config, ns_dtype)``; its availability is probed here. ``auto`` picks per
bucket: CUDA with usable Triton → ``triton`` where the dispatch table says the kernels win, else
torch's batched cuBLAS; CUDA with the compiled extension → ``cuda``; otherwise ``torch``. An
explicitly requested backend that cannot run raises, never falls back silently.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from . import torch_backend

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
MIN_TRITON_CAPABILITY = (8, 0)
MIN_CUDA_CAPABILITY = (7, 5)
# backend="auto" on a CUDA device with usable Triton, per oriented bucket shape (m <= n):
#   a matrix that fits one CTA (small_newton_schulz.fits)  → triton, one kernel for all steps;
#   m >= AUTO_TRITON_MIN_M                                 → triton, symmetric kernels;
#   otherwise                                              → torch's batched cuBLAS.
# A conservative default until GPU results are committed under bench/results/: published
# symmetric kernels beat cuBLAS on H100 only from about m = 2048, and below that launch count
# dominates, which is what the one-kernel path removes (DESIGN.md §3).
AUTO_TRITON_MIN_M = 2048


@functools.lru_cache(maxsize=None)
def _triton_module() -> ModuleType | None:
    try:
        from . import triton_backend
    except ImportError:
        return None
    return triton_backend


def _runnable(name: str) -> ModuleType | None:
    if name == "torch":
        return torch_backend
    if name == "triton":
        return _triton_module()
    return None  # the cuda extension's kernels are not part of this build yet


def _capability(device: torch.device | None) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device if device is not None and device.type == "cuda" else None)


def _triton_status(device: torch.device | None) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not importable ({exc})"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpreting and (device is None or device.type == "cpu"):
        if _triton_module() is None:
            return False, "muon_kernels.triton_kernels failed to import"
        return True, f"triton {triton.__version__} interpreter on the CPU (TRITON_INTERPRET=1; slow, for tests)"
    if device is not None and device.type != "cuda":
        return False, f"triton backend needs a CUDA tensor, got {device.type}"
    cc = _capability(device)
    if cc is None:
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if cc < MIN_TRITON_CAPABILITY:
        return False, f"compute capability {cc[0]}.{cc[1]} < {MIN_TRITON_CAPABILITY[0]}.{MIN_TRITON_CAPABILITY[1]}"
    if _triton_module() is None:
        return False, "muon_kernels.triton_kernels failed to import"
    return True, f"triton {triton.__version__} on compute capability {cc[0]}.{cc[1]}"


def _cuda_status(device: torch.device | None) -> tuple[bool, str]:
    try:
        from .. import _C
    except ImportError:
        return False, "extension not built (muon_kernels._C is missing; install with nvcc on PATH)"
    if device is not None and device.type != "cuda":
        return False, f"cuda backend needs a CUDA tensor, got {device.type}"
    query = _C.device_query()
    if query["driver_version"] == 0:
        return False, "no CUDA device (no NVIDIA driver found)"
    if query["error"] == "cudaErrorInsufficientDriver":
        return False, (
            f"driver too old for the CUDA {query['runtime_version'] // 1000} runtime "
            f"(driver supports CUDA {query['driver_version'] // 1000}.{query['driver_version'] % 1000 // 10})"
        )
    if query["device_count"] == 0:
        return False, "no CUDA device" + (f" ({query['error']})" if query["error"] else "")
    index = device.index if device is not None and device.index is not None else 0
    major, minor = query["capabilities"][index]
    if (major, minor) < MIN_CUDA_CAPABILITY:
        return False, f"compute capability {major}.{minor} < {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}"
    if _runnable("cuda") is None:
        return False, (
            f"extension built ({_C.build_info()['archs']}), but its Newton–Schulz kernels are not "
            "part of this build yet"
        )
    return True, f"extension on compute capability {major}.{minor}"


_STATUS = {
    "torch": torch_backend.status,
    "triton": _triton_status,
    "cuda": _cuda_status,
}


def available_backends(device: torch.device | str | None = None) -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend, for ``device`` (default: this machine)."""
    dev = torch.device(device) if device is not None else None
    return {name: probe(dev) for name, probe in _STATUS.items()}


def _auto_cuda(device: torch.device, m: int | None, n: int | None, ns_dtype: torch.dtype | None) -> tuple[ModuleType, str]:
    if _STATUS["triton"](device)[0]:
        triton_backend = _runnable("triton")
        if m is None:
            return triton_backend, "auto: CUDA with usable Triton"
        if triton_backend.small_path(m, n, ns_dtype, device):
            return triton_backend, f"auto: {m}×{n} fits one CTA, one kernel for all steps"
        if m >= AUTO_TRITON_MIN_M:
            return triton_backend, f"auto: m={m} >= {AUTO_TRITON_MIN_M}, symmetric kernels beat cuBLAS"
        return torch_backend, f"auto: m={m} < {AUTO_TRITON_MIN_M}, batched cuBLAS wins below the crossover"
    if _STATUS["cuda"](device)[0]:
        return _runnable("cuda"), "auto: no usable Triton, compiled extension available"
    return torch_backend, "auto: neither Triton nor the extension can run here"


def select_backend(name: str, device: torch.device, m: int | None = None, n: int | None = None,
                   ns_dtype: torch.dtype | None = None) -> tuple[ModuleType, str]:
    """(backend module, why) for an oriented m×n bucket iterated in ``ns_dtype`` on ``device``;
    raises if ``name`` is a backend that cannot run there."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        ok, reason = _STATUS[name](device)
        if not ok:
            raise ValueError(f"backend={name!r} cannot run on {device}: {reason}")
        return _runnable(name), f"backend={name!r} requested"
    if device.type != "cuda":
        return torch_backend, f"auto: {device.type} tensors take the torch reference"
    return _auto_cuda(device, m, n, ns_dtype)
