# grayproxy: `make run` starts the demo, `make test` runs every check.
# Works on a fresh clone with only python3 (3.11+): the virtualenv is created here.

# The interpreter the venv is built from: the system's python3 when it is 3.11 or newer and
# can create venvs, else python3 on PATH; `make clean` then `make PYTHON=...` picks another.
# Distributions build their python3 with PGO and LTO (Debian, Ubuntu, Fedora), pyenv and asdf
# by default do not: the data path costs 14-19 % less CPU on a PGO build
# (docs/development.md).
SYSTEM_PYTHON := /usr/bin/python3
PYTHON ?= $(shell $(SYSTEM_PYTHON) -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo $(SYSTEM_PYTHON) || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# Stamps: reinstall only when the build files change.
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test
BENCH_INSTALLED := $(VENV)/.installed-bench
# The compiled build (mypyc, see setup.py), what `pip install .` gives users: installed
# beside the tree, never into it, so the everyday loop runs the source with nothing stale.
COMPILED_DIR := build/compiled
COMPILED := $(COMPILED_DIR)/.built
# Run Python on the compiled build: its directory first on the path, the tree's own
# directory only after it (for bench/ and tests/), the current directory never.
WITH_COMPILED := PYTHONSAFEPATH=1 PYTHONPATH=$(CURDIR)/$(COMPILED_DIR):$(CURDIR)
# config/tls-gateway.yaml names certificate files the user makes (the repository ships no
# private keys): tests/test_tls.py checks it against generated ones instead.
CONFIGS ?= $(filter-out config/tls-gateway.yaml,$(wildcard config/*.yaml))
PYTEST_ARGS ?=
# Tests run on every core (pytest-xdist); PYTEST_JOBS= runs them in one process.
PYTEST_JOBS ?= -n auto

.PHONY: run test test-compiled lint format check-config bench mutation clean which-python

run: $(COMPILED)
	$(WITH_COMPILED) $(BIN)/python -m proxy demo

# The source, interpreted: no compiler in the loop.
test: lint
	$(BIN)/pytest $(PYTEST_JOBS) $(PYTEST_ARGS)

# The same suite against the compiled build (.ci/run runs both).
test-compiled: $(COMPILED) $(TEST_INSTALLED)
	$(WITH_COMPILED) GRAYPROXY_EXPECT_COMPILED=1 $(BIN)/pytest -o pythonpath= -p no:cacheprovider \
		$(PYTEST_JOBS) $(PYTEST_ARGS)

lint: $(TEST_INSTALLED)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy proxy bench tests

format: $(TEST_INSTALLED)
	$(BIN)/ruff check --fix proxy tests bench
	$(BIN)/ruff format proxy tests bench

# A config may name its token by environment variable: a placeholder stands in if unset.
check-config: $(INSTALLED)
	@test -n "$(CONFIGS)" || { echo "no config/*.yaml to check"; exit 1; }
	@for config in $(CONFIGS); do \
		GRAYPROXY_TOKEN="$${GRAYPROXY_TOKEN:-placeholder}" $(BIN)/grayproxy check -c "$$config" \
			|| exit 2; \
	done

bench: $(BENCH_INSTALLED) $(COMPILED)
	$(WITH_COMPILED) $(BIN)/python -m bench $(BENCH_ARGS)

# Mutation testing of the pure modules ([tool.mutmut] in pyproject.toml); `mutmut results`
# then lists the survivors, `mutmut show NAME` one of them.
mutation: $(TEST_INSTALLED)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check mutmut==3.8.1
	$(BIN)/mutmut run

# The interpreter a new venv is built from (.ci/run checks it has its headers).
which-python:
	@echo $(PYTHON)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { \
		echo "could not create $(VENV): Debian/Ubuntu need 'apt install python3-venv'"; \
		rm -rf $(VENV); exit 1; }

# Dependencies and the `grayproxy` command, running the source (editable, interpreted).
$(INSTALLED): pyproject.toml setup.py | $(BIN)/python
	GRAYPROXY_PURE=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(TEST_INSTALLED): pyproject.toml setup.py | $(BIN)/python
	GRAYPROXY_PURE=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(INSTALLED)

$(BENCH_INSTALLED): pyproject.toml setup.py | $(BIN)/python
	GRAYPROXY_PURE=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@ $(INSTALLED)

# The package built as a user's `pip install .` builds it (mypyc, a C compiler and Python's
# headers: see setup.py), again whenever a module changes.
$(COMPILED): pyproject.toml setup.py $(wildcard proxy/*.py) $(wildcard proxy/static/*) | $(INSTALLED)
	rm -rf $(COMPILED_DIR)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
		--target $(COMPILED_DIR) .
	touch $@
