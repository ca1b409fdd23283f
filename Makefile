# Quick start: `make demo` (the embedded offline experiment) and `make test` (the test suite).
# Each creates .venv and installs the pinned requirements when they are missing or changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: demo test bench

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	rm -rf $(DEMO_DIR)
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m concept_jax.main --config configs/demo.py --workdir $(DEMO_DIR)

test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest -q tests

bench: $(VENV)/.runtime
	$(PY) -m concept_jax.bench
