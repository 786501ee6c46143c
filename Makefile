# grayproxy: `make run` starts the demo, `make test` runs every check.
# Works on a fresh clone with only python3 (3.11+): the virtualenv is created here.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamps: reinstall only when pyproject.toml changes.
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test
CONFIGS ?= $(wildcard config/*.yaml)
PYTEST_ARGS ?=

.PHONY: run test lint format check-config bench clean

run: $(INSTALLED)
	$(BIN)/grayproxy demo

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(TEST_INSTALLED)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy proxy bench

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

bench: $(INSTALLED)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { \
		echo "could not create $(VENV): Debian/Ubuntu need 'apt install python3-venv'"; \
		rm -rf $(VENV); exit 1; }

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(TEST_INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(INSTALLED)
