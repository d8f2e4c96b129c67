# Two entry points a fresh machine needs: `make train` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test test-all lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## Train the default model (embedded MNIST, CPU, ~10 min); extra Hydra overrides via ARGS="..."
train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

## The default (fast) test suite
test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest $(ARGS)

## Everything, slow tests included
test-all: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -m "slow or not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/samplers.py

clean:
	rm -rf $(VENV) .pytest_cache
