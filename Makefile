# The two commands of the README: `make serve` and `make test`. Both set everything up first.
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup serve test lint unit e2e bench clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

serve: setup
	$(BIN)/obliviate serve $(ARGS)

test: setup lint
	$(BIN)/pytest -ra $(ARGS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -ra -m "not e2e" $(ARGS)

e2e: setup
	$(BIN)/pytest -ra -m e2e $(ARGS)

bench: setup
	$(BIN)/python bench/overhead.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
