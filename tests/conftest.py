"""Fixtures: tiny models built from a config, saved to disk and reloaded through the real from_pretrained,
and small generated datasets. Nothing here touches the network."""
from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

POSITIVE = "good great fine nice superb lovely brilliant moving".split()
NEGATIVE = "bad awful poor terrible dull boring weak clumsy".split()
FILLER = "the a movie film plot acting was is and very quite story cast".split()


def sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_reviews(path: Path, n: int = 240, seed: int = 0, labels=("pos", "neg")) -> Path:
    """A separable sentiment CSV: text with sentiment words, label `labels[0]` or `labels[1]`."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            pos = i % 2 == 0
            w.writerow([sentence(rng, pos), labels[0] if pos else labels[1]])
    return path


@pytest.fixture(autouse=True)
def task_table_kept():
    """A task a test registers (ts.register_task inside the test) leaves the table after it, so that a later test
    does not see it (`tunesmith init` would find two tasks fitting a CSV). Registrations at import stay."""
    from tunesmith import tasks

    saved = dict(tasks._registered)
    yield
    tasks._registered.clear()
    tasks._registered.update(saved)


@pytest.fixture(autouse=True)
def environment_kept(monkeypatch):
    """cli.main() quiets the libraries through os.environ (cli.quiet); restore it after each test, so that a test
    calling main() in-process does not quiet a later test's subprocess (`tunesmith train --verbose`)."""
    for key in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        original = os.environ.get(key)
        monkeypatch.setenv(key, original or "")                 # records the original state for teardown ...
        if original is None:
            monkeypatch.delenv(key)                             # ... and leaves it as it was during the test


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT classifier with a word-level vocabulary, saved as an HF folder."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    import torch
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def reviews(tmp_path) -> Path:
    return write_reviews(tmp_path / "reviews.csv")


def recipe_dict(model: Path, data: Path, **sections) -> dict:
    """A small text-classification recipe for the tiny model; `sections` update its sections."""
    recipe = {
        "task": "text-classification",
        "model": str(model),
        "data": {"train": str(data), "validation_size": 0.2, "test_size": 0.2, "max_length": 32},
        "adapt": {"method": "full"},
        "train": {"epochs": 10, "learning_rate": 3e-3, "batch_size": 16, "seed": 0, "precision": "fp32",
                  "log_every": 1, "warmup": 0, "min_steps": 0},   # tests count steps from their epochs
        "eval": {"batch_size": 32},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def tunesmith(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)
