# `make demo` and `make test` set up .venv from pyproject.toml on first use, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
# Large malloc blocks on transparent huge pages: otherwise XLA:CPU's per-step temporary buffer is
# page-faulted in 4 KiB pages every step (benchmarks/child_env.py). glibc < 2.35 ignores it; a
# GLIBC_TUNABLES already in the environment wins (add glibc.malloc.hugetlb=1 to it yourself).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: need Python 3.11 (found '$(PYTHON)'); run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cappa demo --workdir $(WORKDIR)

# Two workers, one test file each (module fixtures stay shared): ~2x faster on 2 cores. Files go out in
# collection order, longest first (tests/conftest.py), not xdist's most-tests-first. Quiet output (-q) comes
# from pyproject.toml's addopts: a second -q here would hide the "N passed in Xs" line.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest tests -x -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# Both checks always run (each reports its files); the target fails if either fails.
lint: $(STAMP)
	@status=0; $(BIN)/ruff check . || status=1; $(BIN)/ruff format --check . || status=1; exit $$status

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdirs
