"""Build: pure Python + Triton always; the CUDA extension ``muon_kernels._C`` when nvcc is found.

The extension is optional. ``MUON_KERNELS_SKIP_CUDA_BUILD=1`` skips it, and so does a machine
without nvcc (``available_backends()`` then says why ``cuda`` is off). Where nvcc is found the build
must succeed: a failure stops the install with the reason and the way to install without it (pip
shows a build's output only when it fails, so a warning on success would never be seen).
``MUON_KERNELS_CUDA_ARCHS`` (default ``75;80;86;89;90``) picks the archs, checked before CMake
runs; no GPU is needed to build.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "75;80;86;89;90"


def _warn(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nmuon_kernels: {message}\n{bar}\n", file=sys.stderr, flush=True)


def _archs() -> str:
    """The ';'-separated sm numbers to build for, checked (CMake's own error for a bad entry comes
    late and names CMAKE_CUDA_ARCHITECTURES, not the variable the user set)."""
    archs = os.environ.get("MUON_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    # Plain sm numbers only: _C reports them (build_info) and the dispatcher reads them as ints, with
    # the newest one's PTX taken to run on newer GPUs, which an arch-specific 90a/100f PTX does not.
    if not re.fullmatch(r"\d{2,3}(;\d{2,3})*", archs) or min(int(a) for a in archs.split(";")) < 75:
        raise SystemExit(f"muon_kernels: MUON_KERNELS_CUDA_ARCHS={archs!r}: give ';'-separated sm numbers "
                         f"from 75 up (default {DEFAULT_ARCHS}), or MUON_KERNELS_SKIP_CUDA_BUILD=1 to skip the "
                         "CUDA extension")
    return archs


# Ninja prints a finished command's output under its "[k/n] ..." status line (NINJA_STATUS, set for
# the build so a user's own format cannot change it), a failed one's after "FAILED: ...". ptxas's
# resource report of every kernel still compiling follows, so in a log shown by its tail (pip's,
# CI's) the error itself is hundreds of lines up: it is repeated at the end.
_NINJA_STATUS_FORMAT = "[%f/%t] "
_NINJA_STATUS = re.compile(r"^\[\d+/\d+\] ")
_LOW_DISK_BYTES = 2 << 30


def _failed_commands(lines: list[str], max_lines: int = 40) -> list[str]:
    """The blocks of a Ninja log that belong to failed commands, each cut to its last ``max_lines``."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if line.startswith("FAILED: "):
            current = [line]
            blocks.append(current)
        elif current is not None and (_NINJA_STATUS.match(line) or line.startswith("ninja: ")):
            current = None
        elif current is not None:
            current.append(line)
    return ["".join(block[:1] + block[1:][-max_lines:]).rstrip() for block in blocks]


def _low_disk(paths) -> list[str]:
    """A note for each of ``paths`` (the build tree, nvcc's temporary folder) with under 2 GiB free."""
    notes = []
    for path in paths:
        free = shutil.disk_usage(path).free
        if free < _LOW_DISK_BYTES:
            notes.append(f"only {free / 2**30:.1f} GiB free under {path}: nvcc and ptxas fail on a full disk")
    return notes


def _run_build(command: list[str], build_dir: Path) -> None:
    """Run ``command``, its output passed through as it comes; on failure raise with the failed
    commands' own output (and a full disk, if that may be why) as the message's last lines."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=dict(os.environ, NINJA_STATUS=_NINJA_STATUS_FORMAT)) as process:
        lines = []
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    sys.stdout.flush()
    if process.returncode:
        found = _failed_commands(lines) + _low_disk([build_dir, tempfile.gettempdir()])
        raise subprocess.CalledProcessError(process.returncode, command,
                                            output="\n\n".join(found) if found else None)


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


class CMakeBuild(build_ext):
    """Configure and build ``CMakeLists.txt`` with Ninja; the result lands where setuptools expects ``_C``."""

    def run(self):
        if os.environ.get("MUON_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
            _warn("MUON_KERNELS_SKIP_CUDA_BUILD=1: skipping the CUDA extension (cuda backend off).")
            return
        nvcc = _find_nvcc()
        if nvcc is None:
            _warn("nvcc not found (set CUDA_HOME or put nvcc on PATH): installing without the CUDA extension.")
            return
        self.nvcc = nvcc
        self.archs = _archs()
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as exc:
            why = getattr(exc, "output", None)
            raise SystemExit(
                f"muon_kernels: building the CUDA extension with {nvcc} failed ({exc}); "
                + (f"what failed, repeated from the output above:\n{why}\n" if why else "the output above says why. ")
                + "To install without it (the torch and Triton backends need no build), set "
                "MUON_KERNELS_SKIP_CUDA_BUILD=1.") from exc

    def build_extension(self, ext):
        import pybind11

        archs = self.archs
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A persistent build tree keeps rebuilds incremental across `pip install` runs.
        build_dir = Path(os.environ.get("MUON_KERNELS_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DMUON_KERNELS_CUDA_ARCHS={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        _run_build(configure, build_dir)
        _run_build(["cmake", "--build", str(build_dir), "--target", "_C"], build_dir)


setup(
    packages=["muon_kernels", "muon_kernels.backends", "muon_kernels.triton_kernels"],
    package_dir={"muon_kernels.triton_kernels": "triton_kernels"},
    package_data={"muon_kernels.backends": ["crossovers.json"]},
    ext_modules=[Extension("muon_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
