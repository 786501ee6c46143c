# grayproxy: `make run` starts the demo, `make test` runs every check.
# Works on a fresh clone with only python3 (3.11+): the virtualenv is created here.

# The interpreter the venv is built from: the system's python3 when it is 3.11 or newer and
# can create venvs, else python3 on PATH; `make clean` then `make PYTHON=...` picks another.
# Distributions build their python3 with PGO and LTO (Debian, Ubuntu, Fedora), pyenv and asdf
# by default do not: the data path costs 14-19 % less CPU on a PGO build (README, "Which
# Python").
SYSTEM_PYTHON := /usr/bin/python3
PYTHON ?= $(shell $(SYSTEM_PYTHON) -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' \
	2>/dev/null && echo $(SYSTEM_PYTHON) || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# Stamps: reinstall only when the build files change, recompile when the package does.
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test
BENCH_INSTALLED := $(VENV)/.installed-bench
COMPILED := $(VENV)/.compiled
CONFIGS ?= $(wildcard config/*.yaml)
PYTEST_ARGS ?=

.PHONY: run test lint format check-config bench clean which-python

run: $(COMPILED)
	$(BIN)/grayproxy demo

test: lint $(COMPILED)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(TEST_INSTALLED)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy proxy bench

format: $(TEST_INSTALLED)
	$(BIN)/ruff check --fix proxy tests bench
	$(BIN)/ruff format proxy tests bench

# A config may name its token by environment variable: a placeholder stands in if unset.
check-config: $(COMPILED)
	@test -n "$(CONFIGS)" || { echo "no config/*.yaml to check"; exit 1; }
	@for config in $(CONFIGS); do \
		GRAYPROXY_TOKEN="$${GRAYPROXY_TOKEN:-placeholder}" $(BIN)/grayproxy check -c "$$config" \
			|| exit 2; \
	done

bench: $(BENCH_INSTALLED) $(COMPILED)
	$(BIN)/python -m bench $(BENCH_ARGS)

# The interpreter a new venv is built from (.ci/run checks it has its headers).
which-python:
	@echo $(PYTHON)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -f proxy/*.so *__mypyc*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { \
		echo "could not create $(VENV): Debian/Ubuntu need 'apt install python3-venv'"; \
		rm -rf $(VENV); exit 1; }

# Dependencies and the `grayproxy` command, interpreted (no compiler needed)... Each of these
# installs grayproxy itself again, interpreted: that undoes the compiled install (the console
# script would no longer find proxy__mypyc), so the compiled stamp goes and it is redone.
$(INSTALLED): pyproject.toml setup.py | $(BIN)/python
	GRAYPROXY_PURE=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	rm -f $(COMPILED)
	touch $@

$(TEST_INSTALLED): pyproject.toml setup.py | $(BIN)/python
	GRAYPROXY_PURE=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(COMPILED)
	touch $@ $(INSTALLED)

$(BENCH_INSTALLED): pyproject.toml setup.py | $(BIN)/python
	GRAYPROXY_PURE=1 $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	rm -f $(COMPILED)
	touch $@ $(INSTALLED)

# ...then the data path compiled in place (mypyc, see setup.py: proxy/*.so), again whenever
# a module of the package changes. With GRAYPROXY_PURE=1 it stays interpreted.
$(COMPILED): pyproject.toml setup.py $(wildcard proxy/*.py) | $(INSTALLED)
	rm -f proxy/*.so *__mypyc*.so
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@
