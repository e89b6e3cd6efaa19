# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.torchsgd8-built
SOURCES := $(shell find csrc torchsgd8 -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.py') CMakeLists.txt pyproject.toml

.PHONY: demo test test-slow bench build clean gpu-check gpu-check-prepare

$(PY):
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	# bitsandbytes only for interop tests and benchmarks; --no-deps keeps pip from resolving another torch
	$(PY) -m pip install --no-deps bitsandbytes==0.50.2
	touch $@

# Built against the venv's torch (no build isolation: an isolated build would fetch another torch).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

demo: build
	$(PY) -m torchsgd8
	$(PY) examples/train_digits.py

test: build
	$(PY) -m pytest -q tests

test-slow: build
	TORCHSGD8_SLOW_TESTS=1 $(PY) -m pytest -q tests -m slow

bench: build
	$(PY) benchmarks/bench_step.py

# The GPU check of tools/gpu_check.sh (its top says how to run it in one device call); without a GPU,
# `GPU_CHECK_DRY_RUN=1 make gpu-check` tries its phases on CPU. The device machine has no .venv: python3 there.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHON=$(GPU_CHECK_PYTHON) bash tools/gpu_check.sh

gpu-check-prepare:
	PYTHON=$(GPU_CHECK_PYTHON) bash tools/gpu_check.sh --prepare

clean:
	rm -rf build $(VENV) *.egg-info
