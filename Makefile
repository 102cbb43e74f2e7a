# flowmodel — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLOWMODEL_DATA ?= $(abspath ../shared/data)
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0
export NO_MKDOCS_2_WARNING := 1
PYTEST_WORKERS ?= 2
# --dist loadfile: one worker per test file, so a file's expensive fixtures (the fusion
# fits) are built once. (--dist loadgroup with xdist_group marks no longer groups under
# pytest 9.2: pytest-dev/pytest-xdist#1386.) --no-loadscope-reorder keeps the collection
# order, which tests/conftest.py sets to the heaviest files first (HEAVY_FILES).

.PHONY: help venv demo test test-fast lint format docs bench clean

help:
	@echo "make demo       set up .venv if needed, run the simulated-world pipeline, write demo-output/report.html"
	@echo "make test       set up .venv if needed, lint, run the whole test suite (slow tests and docs build included)"
	@echo "make test-fast  the suite without slow tests"
	@echo "make lint       ruff check + ruff format --check + import-linter contracts (the layering)"
	@echo "make docs       build the docs site (warnings are errors)"

# .venv is (re)built when missing or older than pyproject.toml.
$(STAMP): pyproject.toml
	@set -e; py=$$(scripts/find-python.sh); \
	  if [ ! -x $(PY) ] || ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
	    echo "creating $(VENV) with $$py"; rm -rf $(VENV); "$$py" -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowmodel demo --out demo-output

test: $(STAMP)
	$(MAKE) lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15
	$(MAKE) docs

test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check flowmodel tests benchmarks scripts
	$(VENV)/bin/ruff format --check flowmodel tests benchmarks scripts
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix flowmodel tests benchmarks scripts
	$(VENV)/bin/ruff format flowmodel tests benchmarks scripts

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site

clean:
	rm -rf $(VENV) site demo-output .pytest_cache
