# The two commands of the README: `make serve` and `make test`. Both set everything up first.
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup serve test lint unit e2e test-gpu bench eval eval-forget05 clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# The admin API needs a token: keep one in .obliviate/admin-token unless OBLIVIATE_ADMIN_TOKEN is set.
ADMIN_TOKEN_FILE ?= .obliviate/admin-token

serve: setup
	@mkdir -p $(dir $(ADMIN_TOKEN_FILE))
	@[ -s $(ADMIN_TOKEN_FILE) ] || $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(32))" > $(ADMIN_TOKEN_FILE)
	@echo "Admin token (Authorization: Bearer ...) is in $(ADMIN_TOKEN_FILE)"
	OBLIVIATE_ADMIN_TOKEN="$${OBLIVIATE_ADMIN_TOKEN:-$$(cat $(ADMIN_TOKEN_FILE))}" $(BIN)/obliviate serve $(ARGS)

test: setup lint
	$(BIN)/pytest -ra --durations=30 $(ARGS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -ra -m "not e2e" $(ARGS)

e2e: setup
	$(BIN)/pytest -ra -m e2e $(ARGS)

# On a machine with a CUDA device: the torch code paths (δ, SNAP, corruption, scoring, strength
# search) against the same computation on the CPU. Needs no vLLM, FastAPI or model weights:
# GPU_PYTHON=python3 runs it with any Python that has torch, transformers, pydantic and pytest.
GPU_PYTHON ?= $(BIN)/python
test-gpu:
	$(GPU_PYTHON) -m pytest tests/gpu --noconftest -ra $(ARGS)

bench: setup
	$(BIN)/python bench/overhead.py $(ARGS)

# TOFU efficacy table and plot into docs/results/ (needs ../shared/data; fine-tunes are cached).
# TOFU and MMLU: local JSON copies where they are (this workplace's ../shared/data), else the
# Hugging Face hub (`obliviate eval tofu` without --data-dir).
DATA_DIR ?= ../shared/data
eval: setup
	$(BIN)/obliviate eval tofu --forget forget01 $(if $(wildcard $(DATA_DIR)/tofu/full.jsonl),--data-dir $(DATA_DIR)) $(ARGS)

# The setting that carries weight (issue 17): forget05 (10 authors, 200 questions), 10 retain
# authors in both fine-tunes, 100 retain questions, every real-author and world-fact question,
# 300 MMLU questions. Hours on 2 CPU cores; the fine-tunes are cached for reruns.
eval-forget05: setup
	$(BIN)/obliviate eval tofu --forget forget05 --retain-authors 10 --retain-eval 100 \
		--utility-questions null --mmlu-questions 300 \
		$(if $(wildcard $(DATA_DIR)/tofu/full.jsonl),--data-dir $(DATA_DIR)) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
