# Two commands do all the set-up on a fresh machine:
#   make demo   venv + torch + build, then the demo
#   make test   venv + torch + build, then the tests on both backends
PYTHON ?= python3
VENV ?= .venv
# The CUDA 13.0 build of torch: with it the CUDA kernels compile here too (no GPU
# needed). TORCH_SPEC="torch==2.13.0" gives a small CPU-only install.
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
SOURCES := $(shell find csrc lowrank_ext -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml

ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: setup build demo test test-compiled test-fallback bench clean

setup: $(VENV)/.deps $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy pybind11 ninja "setuptools>=77" wheel
	touch $@

# Rebuilt only when a source file changes. --no-build-isolation: compile
# against the torch in this venv rather than a second one pip would fetch.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	$(PY) -m lowrank_ext info
	touch $@

build: setup

demo: setup
	$(PY) -m lowrank_ext demo

test: test-compiled test-fallback

test-compiled: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fallback: setup
	LOWRANK_EXT_FORCE_FALLBACK=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m lowrank_ext bench

clean:
	rm -rf build lowrank_ext/_C*.so *.egg-info $(VENV)
