# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# Both use the python3 on PATH when it already imports torch (a user's CUDA environment, the GPU
# machine: nothing is downloaded there when it has the build tools, which build-tools pip-installs
# otherwise), else make .venv with TORCH_SPEC. The package is installed with --no-build-isolation
# so an offline machine with the build tools present works.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
PYTEST_ARGS ?=
REPRODUCE_ARGS ?=

# The Triton AOT, interpreter and direct-launch tests also run under triton==$(TRITON_OLD) (the GPU machine's
# version) in a second environment. Where the host python already has torch (the GPU machine
# itself, offline) that second environment is not built: the host's Triton is the one to test.
TRITON_OLD ?= 3.6.0
# Its AOT pass compiles every kernel for sm_80, sm_86 and sm_90 (the GPU machine's): each of those has
# its own kernel configurations. sm_89 has sm_86's configurations and shared memory (one compile
# differing only in ptxas's target, ~70 CPU-seconds of a cold Triton cache), and Blackwell's (~4
# CPU-minutes) are compiled by the main pass's Triton only, which compiles every arch.
OLD_TRITON_AOT_SKIP ?= 89 100 120
# Interpreter files it leaves to the main pass: torch.compile's cold compiles of whole training
# steps (~90 CPU-seconds) are Inductor's C++, not Triton; their kernels run in the other files.
OLD_TRITON_INTERPRETER_SKIP ?= test_compiled_step_triton.py

HOST_HAS_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes)
ifeq ($(HOST_HAS_TORCH),yes)
PY := $(PYTHON)
ENV_DEPS :=
OLD_TRITON_ENV :=
# A host environment (a user's CUDA setup, the offline GPU machine) keeps the packages it has: the
# package's dependencies are not resolved or downloaded (only missing build tools are: build-tools). make test then needs pytest and scipy there (hypothesis too,
# or the property tests are skipped).
INSTALL_SPEC := --no-deps .
PEER_SPEC :=
else
PY := $(CURDIR)/.venv/bin/python
ENV_DEPS := .venv/.torch-installed
OLD_TRITON_ENV := .venv-triton-old/.installed-$(TRITON_OLD)
INSTALL_SPEC := ".[test,bench,experiments]"
# Peer oracle for the Gram Newton–Schulz tests and bench rows, without its GPU-only dependencies
# (quack-kernels, cutlass-dsl): its torch path runs on a CPU.
PEER_SPEC := gram-newton-schulz==0.1.6
endif
# make test spreads the suite over TEST_WORKERS processes (pytest-xdist; about half the wall time on
# CI's 2 cores) where pytest-xdist is installed (the test extra, both environments): one per core
# nproc reports, at most 4 (each holds torch; the longest tests bound the gain beyond that).
# Without pytest-xdist (a host environment such as the offline GPU machine), or with
# TEST_WORKERS=1, the suite runs in one process. Tests go out one at a time (--maxschedchunk 1), in
# tests/conftest.py's longest-first order: by default pytest-xdist hands each worker a quarter of its
# share as one contiguous run up front, which put every minutes-long test on the first worker.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
XDIST = $$($(1) -c "import xdist" 2>/dev/null && [ "$(TEST_WORKERS)" -gt 1 ] && echo "-n $(TEST_WORKERS) --maxschedchunk 1")
# make gpu-check: where its results go, and its whole time budget (tests + bench) in minutes.
OUT ?= gpu-check
GPU_CHECK_MINUTES ?= 8.5
GPU_CHECK_TESTS_SHARE ?= 0.45

.PHONY: bench test test-environments test-old-triton reproduce wheel install build-tools clean gpu-check

.venv/.torch-installed:
	$(PYTHON) -m venv .venv
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

build-tools: $(ENV_DEPS)
	@$(PY) -c "import setuptools, wheel, pybind11" 2>/dev/null || $(PY) -m pip install --quiet setuptools wheel pybind11
	@command -v cmake >/dev/null || $(PY) -m pip install --quiet cmake
	@command -v ninja >/dev/null || $(PY) -m pip install --quiet ninja

install: build-tools
	$(PY) -m pip install --quiet --no-build-isolation $(INSTALL_SPEC)
	$(if $(PEER_SPEC),$(PY) -m pip install --quiet --no-deps $(PEER_SPEC))

# numpy unpinned, as on the GPU machine: triton 3.6's interpreter converts 1-element arrays with
# int(), which numpy >= 2.4 refuses, and triton_kernels/config.py squeezes them first (as 3.9 does).
.venv-triton-old/.installed-$(TRITON_OLD):
	$(PYTHON) -m venv .venv-triton-old
	.venv-triton-old/bin/pip install --quiet "$(TORCH_SPEC)" "triton==$(TRITON_OLD)" numpy pytest pytest-xdist scipy hypothesis setuptools wheel
	touch $@

test-old-triton: $(OLD_TRITON_ENV)
ifneq ($(OLD_TRITON_ENV),)
	MUON_KERNELS_SKIP_CUDA_BUILD=1 .venv-triton-old/bin/pip install --quiet --no-build-isolation --no-deps .
	cd tests && ../.venv-triton-old/bin/python -m pytest -q $(call XDIST,../.venv-triton-old/bin/python) test_triton_aot.py test_triton_interpreter.py test_launch.py test_replay.py $(foreach a,$(OLD_TRITON_AOT_SKIP),--deselect "tests/test_triton_aot.py::test_kernels_compile_use_tensor_cores_fit_and_do_not_spill[$(a)]") \
	  $(foreach f,$(OLD_TRITON_INTERPRETER_SKIP),--deselect "tests/test_triton_interpreter.py::test_triton_kernels_on_the_cpu_interpreter[$(f)]")
endif

# Without a host torch, the Triton 3.6 environment is made while the main install builds _C (nvcc
# keeps both cores busy for about a minute; making an environment mostly waits on unpacking): -j2
# over the two, once the main environment's torch is in (so the second one takes pip's cached copy).
test-environments: $(ENV_DEPS)
ifneq ($(OLD_TRITON_ENV),)
	@$(MAKE) --no-print-directory HOST_HAS_TORCH=$(HOST_HAS_TORCH) -j2 install $(OLD_TRITON_ENV)
	@$(MAKE) --no-print-directory HOST_HAS_TORCH=$(HOST_HAS_TORCH) test-old-triton
else
	@$(MAKE) --no-print-directory HOST_HAS_TORCH=$(HOST_HAS_TORCH) install
endif

test: test-environments
	@$(PY) -c "import pytest, scipy" 2>/dev/null || { echo "make test needs pytest and scipy in $(PY)'s environment (pip install pytest scipy hypothesis)"; exit 2; }
	cd tests && $(PY) -m pytest -q $(call XDIST,$(PY)) $(PYTEST_ARGS)

# One prepared command for a lent GPU (README, GPU section): _C built for this device's arch only,
# tests/gpu with NaN-filled work buffers and compute-sanitizer, the budgeted bench, a summary in $(OUT).
# The budget starts before the build (gpu_check.py --started). The build's whole log goes to
# $(OUT)/build.log; a failed CUDA build installs without _C (the Triton tests and rows still run,
# the CUDA ones report "not built"; summary.md says so) rather than stopping the run. exec: make
# then waits for gpu_check.py itself, so a `timeout` around make returns only after its SIGTERM
# handler has stopped the running phase and written the summary.
gpu-check: build-tools
	@started=$$(date +%s); mkdir -p "$(OUT)"; \
	arch=$$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.[:space:]'); \
	if [ -z "$$arch" ]; then echo "make gpu-check needs an NVIDIA GPU (nvidia-smi found none)"; exit 2; fi; \
	echo "building _C for sm_$$arch (log: $(OUT)/build.log)"; \
	note=""; MUON_KERNELS_CUDA_ARCHS=$$arch $(PY) -m pip install -v --no-build-isolation $(INSTALL_SPEC) > "$(OUT)/build.log" 2>&1 \
	|| { tail -n 30 "$(OUT)/build.log"; note="the install with _C for sm_$$arch failed (build.log): installed without _C"; \
	     echo "$$note"; MUON_KERNELS_SKIP_CUDA_BUILD=1 $(PY) -m pip install --quiet --no-build-isolation $(INSTALL_SPEC) || exit 1; }; \
	exec $(PY) bench/gpu_check.py --out "$(OUT)" --minutes $(GPU_CHECK_MINUTES) --tests-share $(GPU_CHECK_TESTS_SHARE) \
	  --started $$started --note "$$note"

bench: install
	cd bench && $(PY) run.py $(BENCH_ARGS)

# The convergence experiments (docs/convergence.md); REPRODUCE_ARGS=--quick for the 5-minute version.
reproduce: install
	cd bench && $(PY) convergence.py $(REPRODUCE_ARGS)

wheel: build-tools
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info .venv .venv-triton-old gpu-check

# One GPU call (bench/README.md, "Kernel notes (Hopper)"): bench/tune.py times the Triton kernels'
# variants against each other and the references and writes ONE JSON into $(OUT). It installs
# without building the CUDA extension (its build time goes to timing; the reinstall drops a _C
# installed before), so it has no CUDA-path rows: for those, run bench/tune.py itself where _C is
# installed (bench/README.md, "The next GPU session"). CPU: `python bench/tune.py --smoke`.
TUNE_MINUTES ?= 4
.PHONY: tune
tune: build-tools
	@nvidia-smi -L >/dev/null 2>&1 || { echo "make tune needs an NVIDIA GPU (CPU harness check: python bench/tune.py --smoke --out DIR)"; exit 2; }
	MUON_KERNELS_SKIP_CUDA_BUILD=1 $(PY) -m pip install --quiet --no-build-isolation $(INSTALL_SPEC)
	$(PY) bench/tune.py --out "$(OUT)" --budget-minutes $(TUNE_MINUTES)
