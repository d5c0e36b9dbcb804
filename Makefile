# Two commands for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test test-core lint docs bench zoo clean

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

# Detection, remedies, overhead and a zoo sample in quick mode (~12 min on 2 shared cores); rewrites
# docs/benchmarks.md (its Zoo and Doctor sections are kept unless `make zoo` left new report seeds).
bench: $(VENV)/.test-deps
	mkdir -p build/bench && rm -f build/bench/*.json
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m benchmarks.detection --json build/bench/detection.json > build/bench/detection.md
	$(BIN)/python -m benchmarks.remedy --json build/bench/remedy.json > build/bench/remedy.md
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m benchmarks.overhead --quick --json build/bench/overhead.json > build/bench/overhead.md
	$(BIN)/python -m benchmarks.zoo --framework torch --quick --workers 2 --json build/bench/zoo-quick-torch.json > build/bench/zoo-quick-torch.md
	$(BIN)/python -m benchmarks.docs_page build/bench docs/benchmarks.md

# The randomised zoo on its report seeds (10000-10599 in PyTorch, 10000-10199 in Keras on TensorFlow: the next fresh sets; rules are
# tuned on 0-99, see benchmarks/zoo/NOTE.md), 2 workers (~45 min on 2 idle cores); writes the Zoo section of docs/benchmarks.md,
# docs/zoo-torch.md and docs/zoo-keras.md.
zoo: $(VENV)/.test-deps
	mkdir -p build/bench
	$(BIN)/python -m benchmarks.zoo --framework torch --seeds 10000-10599 --workers 2 --json build/bench/zoo-torch.json > build/bench/zoo-torch.md
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m benchmarks.zoo --framework keras --seeds 10000-10199 --workers 2 --json build/bench/zoo-keras.json > build/bench/zoo-keras.md
	$(BIN)/python -m benchmarks.zoo.docs build/bench docs/benchmarks.md

clean:
	rm -rf $(VENV) build dist site *.egg-info
