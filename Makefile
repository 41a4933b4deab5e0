# Two entry points, both usable on a fresh machine:
#   make site   builds the website into build/site
#   make test   runs the whole test suite
# Each creates .venv and installs the pinned dependencies on first use.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: site test check serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[reference,dev]'
	touch $(STAMP)

check: $(STAMP)
	$(BIN)/catalog check

site: $(STAMP)
	$(BIN)/catalog build --out build/site

serve: $(STAMP)
	$(BIN)/catalog render && $(BIN)/mkdocs serve

test: $(STAMP)
	$(BIN)/catalog check
	$(BIN)/python -m pytest

clean:
	rm -rf build $(VENV)
