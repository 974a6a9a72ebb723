# tokar: `make demo` and `make test` do all the set-up they need (venv, dependencies, data).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_STAMP := .data_ready
export PYTHONUNBUFFERED := 1

.PHONY: demo demo-tokenizer test test-all bench setup data clean-outputs

setup: $(STAMP) $(DATA_STAMP)

# The venv is (re)built when missing or older than pyproject.toml.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(PY) scripts/deps.py | xargs -d '\n' $(BIN)/pip install -q pytest
	$(PY) scripts/deps.py --no-deps | xargs -d '\n' $(BIN)/pip install -q --no-deps
	@touch $(STAMP)

# Fashion-MNIST: Debian's package where apt and root are there, else torchvision's download at first use.
$(DATA_STAMP):
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) && \
	  echo "Fashion-MNIST: installed Debian's dataset-fashion-mnist"; \
	else echo "Fashion-MNIST: no apt/root here; torchvision will download it into data_cache/ at first use"; fi
	@touch $(DATA_STAMP)

data: $(DATA_STAMP)

# The whole pipeline: msvq tokenizer -> VAR on its tokens -> class grid -> FID-1k (scripts/pipeline.py).
demo: setup
	$(BIN)/python scripts/pipeline.py

# Issue 3's original demo: the FSQ tokenizer alone.
demo-tokenizer: setup
	$(BIN)/python train.py experiment=demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/tokenizer_throughput.py
