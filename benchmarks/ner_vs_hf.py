"""tunesmith's loop vs HF Trainer + DataCollatorForTokenClassification on the same token-classification model,
data and hyperparameters, in one process, both fp32.

    .venv/bin/python benchmarks/ner_vs_hf.py [--rows N] [--epochs E] [--repeats R] [--threads T]

Both fine-tune the bundled MiniLM with a new token head on the NER demo's silver set (Rotten Tomatoes snippets
tagged by spaCy's small English model; tunesmith/recipes/reviews_ner.yaml: batch, lr, warmup, weight decay,
max_length, seed) and are scored by the same code on the same test split: tunesmith's token-classification
evaluation (every word scored once, seqeval entity F1), so the F1 column compares what training produced.
The runs alternate (HF, tunesmith, HF, tunesmith, ... `--repeats` pairs) so that load from other processes
falls on both; each pair gives a ratio, and the table shows every run, the median ratio and its range.
HF Trainer keeps its defaults otherwise (dynamic padding, no length grouping); HF truncates a sentence at
max_length (its usual recipe), tunesmith splits it into windows. Both run with the same torch thread count.
tokens/s: real (non-padding) sub-words trained per second, special tokens included.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")          # no load reports or weight-loading bars
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from text_cls_vs_hf import PeakRSS  # noqa: E402

from tunesmith.pipeline import train  # noqa: E402
from tunesmith.recipe import load  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402

RECIPE = Path(__file__).parent.parent / "tunesmith" / "recipes" / "reviews_ner.yaml"


def run_hf(recipe, tables, task, out_dir: str) -> dict:
    """HF Trainer with its defaults and DataCollatorForTokenClassification; the recipe's hyperparameters."""
    from transformers import (
        AutoModelForTokenClassification,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from tunesmith.assets.bundled import resolve_model

    cfg, tok = recipe.train, task.tokenizer
    set_seed(cfg.seed)
    model = AutoModelForTokenClassification.from_pretrained(
        resolve_model(recipe.model.name), id2label=dict(enumerate(task.names)), label2id=dict(task.label2id))
    rows = tables["train"].rows
    enc = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
              max_length=recipe.data.max_length)
    train_set = []
    for i, r in enumerate(rows):                    # the first sub-word of a word carries its tag, the rest -100
        labels, prev = [], None
        for w in enc.word_ids(i):
            labels.append(-100 if w is None or w == prev else task.label2id[r["tags"][w]])
            prev = w
        train_set.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                          "labels": labels})
    steps = -(-len(train_set) // cfg.batch_size) * cfg.epochs
    warmup = round(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=cfg.batch_size,
                             learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
                             weight_decay=cfg.weight_decay, warmup_steps=warmup, lr_scheduler_type=cfg.scheduler,
                             max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, save_strategy="no",
                             report_to="none", disable_tqdm=True, logging_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, processing_class=tok,
                      data_collator=DataCollatorForTokenClassification(tok))
    with PeakRSS() as mem:
        seconds = trainer.train().metrics["train_runtime"]
    tokens = sum(len(f["input_ids"]) for f in train_set) * cfg.epochs
    return {"name": "HF Trainer + collator (fp32)", "seconds": seconds, "samples": len(train_set) * cfg.epochs,
            "tokens": tokens, "mem": mem.mib, "model": model.eval()}


def run_tunesmith(recipe, out_dir: str) -> dict:
    from transformers import AutoModelForTokenClassification

    with PeakRSS() as mem:
        run = train(recipe, run_dir=out_dir)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    model = AutoModelForTokenClassification.from_pretrained(run.path / "model")
    return {"name": "tunesmith (fp32)", "seconds": summary["train_seconds"] - summary["eval_seconds"],
            "samples": summary["samples"], "tokens": summary["tokens"], "mem": mem.mib, "model": model.eval()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000, help="training rows (default 3,000; 0: all ~10.3k)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="HF/tunesmith pairs, alternating (default 2)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for both (default: torch's, here %(default)s)")
    args = ap.parse_args()
    overrides = [f"train.epochs={args.epochs}", "train.min_steps=0", "eval.before=false", "train.precision=fp32",
                 f"train.threads={args.threads}", "data.test_size=1000"]
    if args.rows:
        overrides.append(f"data.max_rows={args.rows}")
    recipe = load(RECIPE, overrides)
    task = get_task(recipe)
    task.setup()
    tables, _ = load_splits(task, recipe)
    test = task.encode(tables["test"].rows)
    cfg = recipe.train
    print(f"torch {torch.__version__}, {args.threads} threads; train {len(tables['train']):,} sentences, test "
          f"{len(tables['test']):,}; batch {cfg.batch_size}, lr {cfg.learning_rate}, warmup {cfg.warmup}, "
          f"max_length {recipe.data.max_length}, epochs {args.epochs}, seed {cfg.seed}; tags {len(task.names)}")
    from tunesmith.device import cpu_flags

    simd = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"cpu flags: {' '.join(simd) or 'none of avx2/avx512/amx'}; torch kernels "
          f"{torch.backends.cpu.get_cpu_capability()}; load average {os.getloadavg()[0]:.2f} at the start")

    tmp = tempfile.mkdtemp(prefix="bench-ner-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    results = []
    for k in range(args.repeats):
        for arm in ("hf", "ts"):
            torch.set_num_threads(args.threads)
            load_before = os.getloadavg()[0]
            r = run_hf(recipe, tables, task, f"{tmp}/hf{k}") if arm == "hf" else run_tunesmith(recipe, f"{tmp}/ts{k}")
            with torch.no_grad():
                r |= task.evaluate(r.pop("model"), test, recipe.eval.batch_size)
            r["load"] = load_before
            results.append(r)
            print(f"  {r['name']} #{k + 1}: {r['samples'] / r['seconds']:.1f} sentences/s, f1 {r['f1']:.4f} "
                  f"(load average {load_before:.2f} before it)", flush=True)

    print(f"\n{'run':<34}{'sentences/s':>12}{'tokens/s':>10}{'ratio':>7}{'peak MiB':>10}{'f1':>8}{'precision':>10}"
          f"{'recall':>8}{'load':>6}")
    ratios = []
    for k in range(0, len(results), 2):
        base = results[k]["tokens"] / results[k]["seconds"]
        ratios.append(results[k + 1]["tokens"] / results[k + 1]["seconds"] / base)
        for r in results[k:k + 2]:
            tps = r["tokens"] / r["seconds"]
            print(f"{r['name'] + f' #{k // 2 + 1}':<34}{r['samples'] / r['seconds']:>12.1f}{tps:>10.0f}"
                  f"{tps / base:>7.2f}{r['mem']:>10.0f}{r['f1']:>8.4f}{r['precision']:>10.4f}{r['recall']:>8.4f}"
                  f"{r['load']:>6.2f}")
    print(f"\nratio (tokens/s, tunesmith over the HF run before it): median {statistics.median(ratios):.2f}, "
          f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pair(s); load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    print("f1: entity-level micro F1 (seqeval) on the test split, the same scorer for both; peak MiB: resident "
          "memory growth during training")


if __name__ == "__main__":
    main()
