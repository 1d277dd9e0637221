"""Backend registry: which implementations exist, which can run here, and why not.

A backend is a module with ``NAME``, ``status(device) -> (ok, reason)``,
``kernel_path(m, n, ns_dtype) -> (path, why)`` and ``orthogonalize(stack, config, ns_dtype)``.
``auto`` picks per device: CUDA with usable Triton → ``triton``; CUDA with the compiled extension
→ ``cuda``; otherwise ``torch``. An explicitly requested backend that cannot run raises, never
falls back silently.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import torch_backend

BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
MIN_TRITON_CAPABILITY = (8, 0)
MIN_CUDA_CAPABILITY = (7, 5)
# Runtime modules that can orthogonalize today; the triton and cuda entries join when their
# kernels land (their availability is already probed below so users see why they are off).
_RUNNABLE: dict[str, ModuleType] = {torch_backend.NAME: torch_backend}


def _capability(device: torch.device | None) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device if device is not None and device.type == "cuda" else None)


def _triton_status(device: torch.device | None) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not importable ({exc})"
    if device is not None and device.type != "cuda":
        return False, f"triton backend needs a CUDA tensor, got {device.type}"
    cc = _capability(device)
    if cc is None:
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    if cc < MIN_TRITON_CAPABILITY:
        return False, f"compute capability {cc[0]}.{cc[1]} < {MIN_TRITON_CAPABILITY[0]}.{MIN_TRITON_CAPABILITY[1]}"
    if "triton" not in _RUNNABLE:
        return False, "the Triton Newton–Schulz kernels are not part of this build yet"
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
    if "cuda" not in _RUNNABLE:
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


def select_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module that will orthogonalize tensors on ``device``; raises if ``name`` can't."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "auto":
        for candidate in ("triton", "cuda") if device.type == "cuda" else ():
            if _STATUS[candidate](device)[0]:
                return _RUNNABLE[candidate]
        return torch_backend
    ok, reason = _STATUS[name](device)
    if not ok:
        raise ValueError(f"backend={name!r} cannot run on {device}: {reason}")
    return _RUNNABLE[name]
