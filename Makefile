# `make quickstart` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-slow sweeps-small bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,hf-test]'
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/jaxreplay quickstart --workdir=runs/quickstart

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every `:small` sweep of sweeps/ end to end, one after the other, then `jaxreplay report` on each; prints each
# wall time and appends it to $(SMALL_ROOT)/times.jsonl. Starts afresh (a kept workdir would resume, not time).
SMALL_ROOT ?= $(CURDIR)/runs/sweeps_small
sweeps-small: $(STAMP)
	rm -rf $(SMALL_ROOT) && mkdir -p $(SMALL_ROOT)
	JAXREPLAY_SMALL_ROOT=$(SMALL_ROOT) JAXREPLAY_SMALL_TIMES=$(SMALL_ROOT)/times.jsonl \
	  $(PY) -m pytest -m slow -s -q -p no:xdist tests/test_sweeps_small_e2e.py

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
