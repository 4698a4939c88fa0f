# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the pinned CPU build, before anything can pull a CUDA one
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedhealth demo --out runs/demo

# What the project declares, cheapest first: style (ruff, [tool.ruff]), types (mypy, [tool.mypy]),
# layers (lint-imports, [tool.importlinter]); then the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Two workers (CI has two cores; a third made the federations contend: slower, not faster). A
# whole file a worker, so module fixtures run once, but each notebook on its own, and federations
# first, so the two workers finish together (tests/conftest.py). The slowest tests are listed at
# the end: the suite must stay under 20 minutes on CI.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=25

clean:
	rm -rf $(VENV) runs
