# Quick start: `make demo` (the embedded offline experiment) and `make test` (the test suite).
# Each creates .venv, installs the pinned requirements and the package itself (editable: `concept_jax`
# and the `concept-jax` command point at this checkout) when they are missing or changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/negative_transfer
# Two processes share the demo's six runs: on 2 CPU cores one process leaves a third of them idle.
DEMO_WORKERS ?= 2

.PHONY: demo test bench

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The dependencies come from the pins above; pip fetches setuptools to build the editable install.
# -qq: errors only; setuptools warns in a 10-line box that a folder named like the package may be
# imported instead of it, which is the point of an editable install of this checkout.
$(VENV)/.package: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -qq --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.package requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

# Finished runs in DEMO_DIR are read back, not trained again (the full benchmark shares the directory).
demo: $(VENV)/.package
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m concept_jax.main --config configs/negative_transfer.py:demo --workdir $(DEMO_DIR) --workers=$(DEMO_WORKERS)

# The allocator settings the entry points give themselves (concept_jax/runtime.py), for the tests.
# TEST_WORKERS pytest processes (pytest-xdist) take whole test files each: compiling and tracing keep
# one process on one core, so 2 halve the suite's time on a 2-core machine (each needs ~5 GB).
TEST_WORKERS ?= 2
test: $(VENV)/.test
	GLIBC_TUNABLES=$$($(PY) -c 'from concept_jax import runtime; print(runtime.MALLOC_TUNABLES)') \
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(VENV)/.package
	$(PY) -m concept_jax.bench
