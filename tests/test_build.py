"""The optional CUDA extension: built by `pip install .` when nvcc exists, importable without a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import muon_kernels as mk

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
SKIPPED = os.environ.get("MUON_KERNELS_SKIP_CUDA_BUILD") == "1"
EXPECTED_ARCHS = os.environ.get("MUON_KERNELS_CUDA_ARCHS", "75;80;86;89;90").split(";")


def test_extension_presence_matches_the_build_machine():
    ok, reason = mk.available_backends()["cuda"]
    if NVCC is None or SKIPPED:
        assert not ok and reason.startswith("extension not built")
        return
    from muon_kernels import _C

    info = _C.build_info()
    assert info["archs"].split(",") == EXPECTED_ARCHS
    assert info["cuda_version"] >= 12000
    query = _C.device_query()
    assert set(query) == {"device_count", "driver_version", "runtime_version", "error", "capabilities", "names"}
    assert len(query["capabilities"]) == query["device_count"]
    if not torch.cuda.is_available():
        assert not ok and reason.startswith(("no CUDA device", "driver too old"))


@pytest.mark.skipif(NVCC is None or SKIPPED, reason="nvcc is not on this machine, so _C was not built")
def test_extension_carries_sass_for_every_requested_arch():
    from muon_kernels import _C

    # The toolkit's cuobjdump when it has one, else the copy that ships inside the triton wheel.
    cuobjdump = Path(NVCC).parent / "cuobjdump"
    if not cuobjdump.is_file():
        import triton

        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    listing = subprocess.run([str(cuobjdump), "--list-elf", _C.__file__], capture_output=True, text=True, check=True)
    archs = {line.rsplit(".sm_", 1)[1].split(".")[0] for line in listing.stdout.splitlines() if ".sm_" in line}
    assert archs == set(EXPECTED_ARCHS)


@pytest.mark.skipif(NVCC is None or SKIPPED, reason="nvcc is not on this machine, so _C is not built")
def test_wheel_carries_the_extension(tmp_path):
    """What `make wheel` runs: the wheel holds _C and the dispatch table next to the Python package."""
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("muon_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("muon_kernels/_C.") and n.endswith(".so") for n in names)
    assert {"muon_kernels/backends/cuda_backend.py", "muon_kernels/backends/crossovers.json",
            "muon_kernels/triton_kernels/newton_schulz.py"} <= set(names)


ROOT = Path(__file__).resolve().parents[1]
# What a checkout holds besides what the sdist must carry: environments, build trees, caches.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                     ".pytest_cache", "gpu-check")


def test_sdist_carries_what_builds_the_extension_and_runs_the_suite(tmp_path):
    """`pip install muon-kernels-*.tar.gz` must build the same _C as a checkout (CMakeLists.txt and
    csrc/; a source install without them would lack the CUDA extension) and ship the license, the
    suite's helpers and the benchmarks."""
    import sys
    import tarfile

    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=_NOT_SOURCE)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree, check=True,
                   capture_output=True, env=dict(os.environ, MUON_KERNELS_SKIP_CUDA_BUILD="1"))
    (archive,) = (tmp_path / "dist").glob("muon[-_]kernels-*.tar.gz")  # setuptools < 69.3 keeps the hyphen
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {str(p.relative_to(ROOT)) for d in ("csrc", "triton_kernels", "tests", "bench", "docs", "muon_kernels")
              for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"}
    wanted |= {"LICENSE", "README.md", "DESIGN.md", "Makefile", "CMakeLists.txt", "pyproject.toml", "setup.py", ".ci/run"}
    assert not wanted - names, sorted(wanted - names)[:20]


def _setup_build_ext(tmp_path, cmake: str | None = None, before: str = "", **env) -> subprocess.CompletedProcess:
    """`setup.py build_ext` with a stand-in nvcc that fails whatever it is asked (CUDA_HOME points at it),
    ``cmake`` (a shell script's body) as the cmake on PATH if given, and ``before`` run in setup.py's
    process first."""
    import sys

    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'stand-in nvcc: refusing' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    if cmake is not None:
        stand_in = tmp_path / "tools" / "cmake"
        stand_in.parent.mkdir()
        stand_in.write_text("#!/bin/sh\n" + cmake)
        stand_in.chmod(0o755)
        env["PATH"] = f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}"
    argv = ["setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "temp")]
    script = f"{before}\nimport runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path('setup.py', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, CUDA_HOME=str(tmp_path / "cuda"),
                                                MUON_KERNELS_BUILD_DIR=str(tmp_path / "cmake"), **env))


@pytest.mark.parametrize("archs", ["foo", "80,90", "70;80", "90;", "90a"])
def test_a_bad_arch_list_stops_the_build_naming_the_variable(tmp_path, archs):
    run = _setup_build_ext(tmp_path, MUON_KERNELS_CUDA_ARCHS=archs)
    assert run.returncode != 0
    assert f"MUON_KERNELS_CUDA_ARCHS={archs!r}" in run.stderr and "MUON_KERNELS_SKIP_CUDA_BUILD=1" in run.stderr


def test_a_failing_cuda_build_stops_the_install_and_says_how_to_skip_it(tmp_path):
    """pip shows a build's output only when it fails: a warning on success would go unseen and the
    wheel would lack _C. Where nvcc exists the build must succeed or stop."""
    run = _setup_build_ext(tmp_path, MUON_KERNELS_CUDA_ARCHS="90")
    assert run.returncode != 0
    assert "building the CUDA extension with" in run.stderr and "MUON_KERNELS_SKIP_CUDA_BUILD=1" in run.stderr
    assert not list((tmp_path / "lib").rglob("_C*"))


# Ninja's log of a build whose second command fails: the error, then the resource reports of the
# commands still running (ptxas --resource-usage, a few lines per kernel and arch).
_NINJA_LOG = """[1/5] Building CXX object CMakeFiles/_C.dir/csrc/bindings.cpp.o
[2/5] Building CUDA object CMakeFiles/_C.dir/csrc/fused_update.cu.o
FAILED: CMakeFiles/_C.dir/csrc/fused_update.cu.o
/usr/local/cuda/bin/nvcc -c csrc/fused_update.cu -o CMakeFiles/_C.dir/csrc/fused_update.cu.o
nvcc error   : 'ptxas' died due to signal 9 (Kill signal)
[3/5] Building CUDA object CMakeFiles/_C.dir/csrc/newton_schulz.cu.o
"""
_PTXAS_NOISE = "ptxas info    : Used 127 registers, used 1 barriers"


def test_a_failed_build_ends_its_message_with_the_failed_command_and_a_full_disk(tmp_path):
    """CI and pip show a failed build by its tail, where ptxas's reports of the commands still running
    had pushed the error out of sight (a build on a full disk): the failed command's own output, and a
    disk short of space, end the message."""
    (tmp_path / "ninja.log").write_text(_NINJA_LOG)
    cmake = ('case "$*" in *--build*) ;; *) exit 0 ;; esac\n'
             f"cat '{tmp_path / 'ninja.log'}'\n"
             f"i=0; while [ $i -lt 400 ]; do echo '{_PTXAS_NOISE}'; i=$((i+1)); done\n"
             "echo 'ninja: build stopped: subcommand failed.'\nexit 1\n")
    low_disk = "import shutil\nshutil.disk_usage = lambda path: shutil._ntuple_diskusage(100 << 30, 99 << 30, 1 << 29)"
    run = _setup_build_ext(tmp_path, cmake=cmake, before=low_disk, MUON_KERNELS_CUDA_ARCHS="90")
    assert run.returncode != 0
    assert run.stdout.count(_PTXAS_NOISE) == 400  # the build's output still passes through, whole
    message = run.stderr[run.stderr.index("building the CUDA extension with"):]
    assert _PTXAS_NOISE not in message
    failed = message.index("FAILED: CMakeFiles/_C.dir/csrc/fused_update.cu.o")
    assert message.index("'ptxas' died due to signal 9") > failed
    assert "newton_schulz" not in message and "[3/5]" not in message
    assert message.index(f"only 0.5 GiB free under {tmp_path / 'cmake'}") > failed
    assert "MUON_KERNELS_SKIP_CUDA_BUILD=1" in message


def test_a_failed_build_with_room_on_disk_says_nothing_of_it(tmp_path):
    """Also with a user's own NINJA_STATUS: the build sets the status-line format the summary reads."""
    (tmp_path / "ninja.log").write_text(_NINJA_LOG)
    cmake = ('case "$*" in *--build*) ;; *) exit 0 ;; esac\n'
             '[ "$NINJA_STATUS" = "[%f/%t] " ] || { echo "NINJA_STATUS=$NINJA_STATUS"; exit 3; }\n'
             f"cat '{tmp_path / 'ninja.log'}'\nexit 1\n")
    run = _setup_build_ext(tmp_path, cmake=cmake, MUON_KERNELS_CUDA_ARCHS="90", NINJA_STATUS="%p %e: ")
    assert run.returncode != 0 and "'ptxas' died due to signal 9" in run.stderr
    assert ("GiB free" in run.stderr) == (shutil.disk_usage(tmp_path).free < 2 << 30)


def test_an_import_from_the_source_tree_says_to_install(tmp_path):
    """The repository root on sys.path imports the source ``muon_kernels`` (no triton_kernels inside,
    no _C): the missing backends say so and how to fix it; the installed package never does."""
    repo = Path(__file__).resolve().parent.parent
    for name in ("muon_kernels", "triton_kernels"):
        shutil.copytree(repo / name, tmp_path / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = ("import json, muon_kernels as mk; "
              "print(json.dumps([mk.__file__, mk.available_backends('cpu'), mk.available_backends()]))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    where, on_cpu, here = json.loads(out.splitlines()[-1])
    assert Path(where).parent == tmp_path / "muon_kernels"
    note = f"imported from its source tree {tmp_path}, which has neither: install it (pip install .)"
    assert not on_cpu["triton"][0] and on_cpu["triton"][1].startswith("muon_kernels.triton_kernels failed to import")
    assert note in on_cpu["triton"][1]
    assert not here["cuda"][0] and here["cuda"][1].startswith("extension not built") and note in here["cuda"][1]
    assert mk.available_backends("cpu")["triton"][0] is (os.environ.get("TRITON_INTERPRET") == "1")
    assert not any("source tree" in reason for _, reason in mk.available_backends().values())
