"""GPU smoke test and throughput on models built from a config (random weights; no downloads).

    python benchmarks/gpu_check.py [--steps N] [--only text,causal,image]

For each task: tunesmith trains on the GPU with `precision: auto` (bf16 where supported), and the same model,
data and batch size go through HF Trainer (bf16=True) in the same process. Prints samples/s (and real tokens/s),
the ratio, peak GPU memory, and model FLOP utilisation against a bf16 matmul peak measured in this run.
Training FLOPs per real token = 6 x non-embedding parameters + 12 x layers x hidden x sequence length.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from tunesmith.pipeline import train
from tunesmith.recipe import load

WORDS = [f"w{i}" for i in range(3000)]


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_token(model, seq: float) -> float:
    cfg = model.config
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    return 6 * (sum(p.numel() for p in model.parameters()) - emb) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def text_setup(tmp: Path, rows: int):
    """BERT-base shape (12 x 768) from a config, a word-level tokenizer, and a CSV of 20-120-word texts."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp / "bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab))).save_pretrained(folder)
    rng = random.Random(0)
    with open(tmp / "text.csv", "w") as f:
        f.write("text,label\n")
        for i in range(rows):
            f.write(" ".join(rng.choices(WORDS, k=rng.randint(20, 120))) + f",{i % 2}\n")
    return folder, tmp / "text.csv"


def hf_text(folder: Path, data: Path, batch: int, steps: int, max_length: int) -> dict:
    import csv

    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(folder)
    rows = list(csv.DictReader(open(data)))
    enc = tok([r["text"] for r in rows], truncation=True, max_length=max_length)
    dataset = [{"input_ids": i, "attention_mask": m, "labels": int(r["label"])}
               for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    args = TrainingArguments(output_dir=str(data.parent / "hf"), per_device_train_batch_size=batch, max_steps=steps,
                             bf16=True, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok))
    torch.cuda.reset_peak_memory_stats()
    m = trainer.train().metrics
    tokens = sum(len(x["input_ids"]) for x in dataset) / len(dataset) * batch * steps
    return {"seconds": m["train_runtime"], "samples": batch * steps, "tokens": tokens, "model": model,
            "mem": torch.cuda.max_memory_allocated() / 2**30}


def tunesmith_run(recipe: dict, out: Path) -> dict:
    torch.cuda.reset_peak_memory_stats()
    run = train(load(recipe), run_dir=out)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    s = next(x for x in lines if x.get("summary"))
    print(f"tunesmith: {s['train_seconds']:.1f}s in the loop, of which evaluation {s['eval_seconds']:.1f}s and "
          f"checkpoint writes {s['checkpoint_seconds']:.1f}s (both excluded below)")
    return {"seconds": s["train_seconds"] - s["eval_seconds"] - s["checkpoint_seconds"], "samples": s["samples"],
            "tokens": s["tokens"],
            "mem": torch.cuda.max_memory_allocated() / 2**30, "run": run}


def report(name: str, peak: float, ours: dict, base: dict, model) -> None:
    for label, r in (("HF Trainer bf16", base), ("tunesmith auto", ours)):
        seq = r["tokens"] / r["samples"]
        tflops = flops_per_token(model, seq) * r["tokens"] / r["seconds"] / 1e12
        print(f"{name:<7}{label:<18}{r['samples'] / r['seconds']:>10.1f} samples/s {r['tokens'] / r['seconds']:>10.0f}"
              f" tokens/s  MFU {100 * tflops / peak:5.1f}%  peak mem {r['mem']:5.1f} GiB")
    ratio = (ours['samples'] / ours['seconds']) / (base['samples'] / base['seconds'])
    print(f"{name:<7}ratio tunesmith / HF: {ratio:.2f}")


def text(tmp: Path, steps: int, peak: float) -> None:
    folder, data = text_setup(tmp, rows=64 * steps + 2000)
    batch, max_length = 64, 128
    recipe = {"task": "text-classification", "model": str(folder),
              "data": {"train": str(data), "validation_size": 256, "test_size": 256, "max_length": max_length},
              "train": {"max_steps": steps, "batch_size": batch, "learning_rate": 5e-5, "log_every": 20}}
    ours = tunesmith_run(recipe, tmp / "ts-text")
    base = hf_text(folder, data, batch, steps, max_length)
    report("text", peak, ours, base, base["model"])


def image(tmp: Path, steps: int, peak: float) -> None:
    """MobileNetV2 (torchvision layout, random weights) on generated 28 px images resized to 224: images/s."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from image_cls_vs_torch import generated_images
    from transformers import MobileNetV2ForImageClassification

    from tunesmith.assets import mobilenet

    folder = tmp / "mnv2"
    MobileNetV2ForImageClassification(mobilenet.config(num_labels=3)).save_pretrained(folder)
    mobilenet.processor().save_pretrained(folder)
    data = generated_images(tmp / "images", per_class=1200)
    recipe = {"task": "image-classification", "model": str(folder),
              "data": {"train": str(data), "validation_size": 256, "test_size": 256},
              "augment": {"hflip": 0.5, "crop_scale": [0.7, 1.0]},
              "train": {"max_steps": steps, "batch_size": 128, "learning_rate": 1e-3, "log_every": 20}}
    r = tunesmith_run(recipe, tmp / "ts-image")
    acc = json.loads((r["run"].path / "eval.json").read_text())["accuracy"]
    print(f"image  tunesmith auto   {r['samples'] / r['seconds']:>10.1f} images/s  peak mem {r['mem']:5.1f} GiB"
          f"  test accuracy {acc:.3f} (3 classes)")


def causal(tmp: Path, steps: int, peak: float) -> None:
    """SmolLM2-135M shape (30 x 576, GQA 9/3) from a config, word-level chat tokenizer, 40-200-word answers.
    tunesmith: full fine-tuning with packing; HF Trainer: the same examples padded per batch. Real tokens/s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        DataCollatorForSeq2Seq,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
    )

    folder = tmp / "llama"
    template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", pad_token="<pad>", chat_template=template)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    rng = random.Random(0)
    with open(tmp / "chat.jsonl", "w") as f:
        for _ in range(16 * steps + 600):
            q = " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(40, 200)))
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": messages}) + "\n")
    recipe = {"task": "causal-lm", "model": str(folder), "adapt": {"method": "full"},
              "data": {"train": str(tmp / "chat.jsonl"), "validation_size": 64, "test_size": 64, "max_length": 512},
              "train": {"max_steps": steps, "batch_size": 8, "packing": True, "pack_length": 2048,
                        "learning_rate": 1e-4, "log_every": 20}, "eval": {"batch_size": 16}}
    ours = tunesmith_run(recipe, tmp / "ts-causal")

    from tunesmith.splits import load_splits
    from tunesmith.tasks import get_task
    rec = load({**recipe, "train": {**recipe["train"], "packing": False}})
    task = get_task(rec)
    tables, _ = load_splits(task, rec)
    task.load_model()
    feats = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in task.encode(tables["train"].rows)]
    model = LlamaForCausalLM.from_pretrained(folder)
    batch = 16
    args = TrainingArguments(output_dir=str(tmp / "hf-causal"), per_device_train_batch_size=batch,
                             max_steps=steps, bf16=True, save_strategy="no", report_to="none", disable_tqdm=True,
                             learning_rate=1e-4, logging_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=feats, processing_class=tok,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    torch.cuda.reset_peak_memory_stats()
    m = trainer.train().metrics
    mean = sum(len(f["input_ids"]) for f in feats) / len(feats)
    base = {"seconds": m["train_runtime"], "samples": batch * steps, "tokens": mean * batch * steps,
            "mem": torch.cuda.max_memory_allocated() / 2**30}
    report("causal", peak, ours, base, model)


SECTIONS = {"text": text, "causal": causal, "image": image}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", default=",".join(SECTIONS))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a GPU"
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; bf16 {torch.cuda.is_bf16_supported()}")
    peak = matmul_peak()
    print(f"bf16 matmul peak: {peak:.0f} TFLOP/s")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # run folders: GBs per run
    for name in args.only.split(","):
        t = time.perf_counter()
        SECTIONS[name](tmp, args.steps, peak)
        print(f"{name}: section took {time.perf_counter() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
