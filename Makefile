# Quick start: `make demo` (fine-tunes on the built-in dataset) and `make test`
# (the whole suite, what CI runs); `make test-fast` leaves out the tests that
# train a ResNet50 or start processes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast clean

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

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs
