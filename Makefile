# Two commands on a fresh machine: `make bench` (the main job) and `make test`.
# Both use the python3 on PATH when it already imports torch (a user's CUDA environment, the GPU
# machine: nothing is downloaded there), else make .venv with TORCH_SPEC. The package is installed
# with --no-build-isolation so an offline machine with the build tools present works.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
PYTEST_ARGS ?=

HOST_HAS_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo yes)
ifeq ($(HOST_HAS_TORCH),yes)
PY := $(PYTHON)
ENV_DEPS :=
else
PY := $(CURDIR)/.venv/bin/python
ENV_DEPS := .venv/.torch-installed
endif

.PHONY: bench test wheel install build-tools clean

.venv/.torch-installed:
	$(PYTHON) -m venv .venv
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

build-tools: $(ENV_DEPS)
	@$(PY) -c "import setuptools, wheel, pybind11" 2>/dev/null || $(PY) -m pip install --quiet setuptools wheel pybind11
	@command -v cmake >/dev/null || $(PY) -m pip install --quiet cmake
	@command -v ninja >/dev/null || $(PY) -m pip install --quiet ninja

install: build-tools
	$(PY) -m pip install --quiet --no-build-isolation ".[test]"

test: install
	cd tests && $(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	cd bench && $(PY) step.py $(BENCH_ARGS)

wheel: build-tools
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info .venv
