# Quick start: `make demo` (fine-tunes on the built-in dataset) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

# Reinstalls only when the package metadata changes; `make setup` is idempotent.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/python -m tf_finetune.main --flagfile=configs/demo.cfg

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
