# segexp — `make help` lists the targets. Every target installs what it needs on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXPERIMENT ?= cam_shapes
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow test-all lint format bench clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --no-cache-dir --upgrade pip
	$(PIP) install --quiet --no-cache-dir $(TORCH_PINS)
	$(PIP) install --quiet --no-cache-dir -e ".[dev]" $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP) ## create .venv: pinned torch/torchvision first, then segexp (editable) + dev extras

train: $(STAMP) ## train + test the default experiment (EXPERIMENT=cam_shapes); any Hydra override via ARGS="..."
	$(PY) -m segexp.train +experiment=$(EXPERIMENT) $(ARGS)

# Two pytest workers with one torch thread each: on 2 cores, more threads than cores makes
# OpenMP spin-wait and every step several times slower.
test: $(STAMP) ## the default test suite (what CI runs)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS)

test-slow: $(STAMP) ## only the long end-to-end runs (marked slow)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal -m slow $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check segexp tests

format: $(STAMP) ## ruff check --fix (lint autofixes only; the code is not run through `ruff format`)
	$(VENV)/bin/ruff check --fix segexp tests

bench: $(STAMP) ## speed/memory benchmarks (python -m segexp.bench --help)
	$(PY) -m segexp.bench $(ARGS)

clean: ## remove caches (keeps .venv, data/ and logs/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
