# `make quickstart` sets up and runs the main job; `make test` sets up and runs the tests.
# Each installs only what it needs: the quickstart the package itself, the tests the `test` extra as well
# (torch, datasets, lm-eval, W&B, TensorBoard). One stamp per set, so `make quickstart` stays light.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORE_STAMP := $(VENV)/.installed-core
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup setup-test quickstart test test-slow sweeps-small bench mutants

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(CORE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $(CORE_STAMP)

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

setup: $(CORE_STAMP)

setup-test: $(TEST_STAMP)

quickstart: $(CORE_STAMP)
	$(VENV)/bin/jaxreplay quickstart --workdir=runs/quickstart

test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 -q

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow

# Deliberate bugs (tests/mutants.py), each applied in turn to a copy of the tree: prints which the fast tests catch.
mutants: $(TEST_STAMP)
	$(PY) tests/mutants.py $(MUTANTS_ARGS)

# Every `:small` sweep of sweeps/ end to end, one after the other, then `jaxreplay report` on each; prints each
# wall time and appends it to $(SMALL_ROOT)/times.jsonl. Starts afresh (a kept workdir would resume, not time).
SMALL_ROOT ?= $(CURDIR)/runs/sweeps_small
sweeps-small: $(TEST_STAMP)
	rm -rf $(SMALL_ROOT) && mkdir -p $(SMALL_ROOT)
	JAXREPLAY_SMALL_ROOT=$(SMALL_ROOT) JAXREPLAY_SMALL_TIMES=$(SMALL_ROOT)/times.jsonl \
	  $(PY) -m pytest -m slow -s -q -p no:xdist tests/test_sweeps_small_e2e.py

# Every benchmark of benchmarks/ at the sizes for the platform found, as one JSON object (docs/performance.md).
bench: $(CORE_STAMP)
	$(PY) benchmarks/suite.py
