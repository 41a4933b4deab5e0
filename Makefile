# Two entry points, both usable on a fresh machine:
#   make site   builds the website into build/site
#   make test   runs the whole test suite, then the kernel tests again on the GPU machine's Triton
# Each creates .venv (and .venv-gpu-triton) and installs the pinned dependencies on first use.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The lent GPU machines run Triton 3.6 (with their own torch 2.11); CI installs 3.9. The kernels must
# work on both, so `make test` also runs the kernel tests (interpreter and sm_90 compilation) on 3.6.
# NumPy 2.2: Triton 3.6's interpreter turns one-element arrays into ints, which NumPy 2.4 refuses.
GPU_VENV  := .venv-gpu-triton
GPU_STAMP := $(GPU_VENV)/.installed

.PHONY: site test test-gpu-triton check lint format serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[reference,dev]'
	touch $(STAMP)

check: $(STAMP)
	$(BIN)/catalog check --strict-impl

site: $(STAMP)
	$(BIN)/catalog build --out build/site

serve: $(STAMP)
	$(BIN)/catalog render && $(BIN)/mkdocs serve

$(GPU_STAMP): Makefile
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet torch==2.13.0 triton==3.6.0 numpy==2.2.6 pytest==9.2.0
	touch $(GPU_STAMP)

# ruff, configured in pyproject.toml: lint, import order and formatting (make format applies them).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) lint
	$(BIN)/catalog check --strict-impl
	$(BIN)/python -m pytest
	$(MAKE) test-gpu-triton

test-gpu-triton: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_kernels_*.py

clean:
	rm -rf build $(VENV) $(GPU_VENV)
