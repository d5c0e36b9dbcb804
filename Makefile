# Two commands for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test test-core lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-deps: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[torch]'
	touch $@

$(VENV)/.test-deps: pyproject.toml $(CONSTRAINTS) requirements/test.txt | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]' -r requirements/test.txt
	touch $@

demo: $(VENV)/.demo-deps
	$(BIN)/gradwatch demo

test: $(VENV)/.test-deps
	bash scripts/test.sh

test-core: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q tests/core

lint: $(VENV)/.test-deps
	$(BIN)/ruff check gradwatch integrations tests benchmarks
	$(BIN)/mypy

docs: $(VENV)/.test-deps
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info
