# Two entry points a fresh machine needs: `make train` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test test-all lint bench bench-quick bench-gpu clean

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

## Benchmarks (bench/results/*.json + .md). CPU: `make bench` (~15 min) or `make bench-quick`;
## GPU: `make bench-gpu EDM_PATH=/path/to/NVlabs/edm` (see docs/performance.md)
EDM_PATH ?=
bench: $(STAMP)
	$(BIN)/python bench/samplers.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/host_overhead.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/ddp.py
	$(BIN)/python bench/edm_compare.py $(if $(EDM_PATH),--edm-path $(EDM_PATH))
	$(BIN)/python bench/data.py $(if $(EDM_PATH),--edm-path $(EDM_PATH))

bench-quick: $(STAMP)
	$(BIN)/python bench/overhead.py --quick
	$(BIN)/python bench/host_overhead.py --quick
	$(BIN)/python bench/throughput.py --quick
	$(BIN)/python bench/sampling.py --quick
	$(BIN)/python bench/ddp.py --quick
	$(BIN)/python bench/edm_compare.py --quick $(if $(EDM_PATH),--edm-path $(EDM_PATH))

bench-gpu: $(STAMP)
	$(BIN)/python bench/overhead.py --device cuda
	$(BIN)/python bench/host_overhead.py --device cuda
	$(BIN)/python bench/throughput.py --device cuda --models unet_ddpmpp --batch 128 \
		--precisions 32-true bf16-mixed --compile --warmup 20 --steps 50
	$(BIN)/python bench/sampling.py --device cuda --model unet_ddpmpp --resolution 32 --channels 3 \
		--batch 256
	$(BIN)/python bench/edm_compare.py --device cuda --batch 128 --compile --warmup 20 --steps 50 \
		$(if $(EDM_PATH),--edm-path $(EDM_PATH))

clean:
	rm -rf $(VENV) .pytest_cache
