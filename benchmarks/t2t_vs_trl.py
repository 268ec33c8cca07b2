"""tunesmith text2text (decoder-only) vs TRL's SFTTrainer, same model, data, features and settings, one process.

    .venv/bin/python benchmarks/t2t_vs_trl.py [--rows N] [--steps S] [--batch B] [--lr LR] [--held-out H]

Defaults (360 rows, 12 steps of 8, 48 validation pairs) are sized to finish in about 5 minutes on 2 quiet cores:
each side's training, then 3 forward passes over the validation pairs (each trained model and the base model) and
tunesmith's own validation and test evaluation (left out of its timing).

The model: the bundled SmolLM2-135M-Instruct, full fine-tuning, fp32. The data: bundled Rotten Tomatoes snippets,
source "summarize: " + snippet, target its first 8 words, as text2text encodes them for a decoder-only model (one user
turn, the prompt, and one assistant turn, the target, in SmolLM2's chat template; sources cut at 64 tokens, targets
at 16; the prompt masked). TRL gets those same features as an "input_ids"/"labels" dataset (so it trains on the
target tokens only, completion-only; on CPU its fused LM head scores every position, then masks), no packing, its own
padding collator; both: S optimizer steps of B pairs, AdamW at --lr, linear schedule without warmup, weight decay
0.01, clipping at 1.0, the same thread count.

Prints training tokens/s of each (the real, non-pad tokens each side trained on: TRL's own count, num_tokens, and
tunesmith's summary `tokens`; a few steps see a fraction of an epoch, so a mean per pair would not do: tunesmith's
length-grouped batches and TRL's random ones differ in length), their ratio, and the token-weighted validation
loss of each trained model over the same held-out targets (one evaluation function: the task's).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from t2t_vs_hf import write_pairs  # noqa: E402

from tunesmith.pipeline import train  # noqa: E402
from tunesmith.recipe import load  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402


def mean_tokens(features) -> float:
    return sum(len(f["input_ids"]) for f in features) / len(features)


def val_loss(task, model, features) -> float:
    with torch.no_grad():
        return task.losses(model.eval(), features, 16)["loss"]


def run_trl(task, model_dir, features, val, steps, batch, lr, out_dir) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_list([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
    args = SFTConfig(out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
                     lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
                     logging_steps=steps, save_strategy="no", report_to="none", use_cpu=True, seed=42,
                     dataloader_num_workers=0, packing=False, padding_free=False, gradient_checkpointing=False,
                     max_length=None, bf16=False, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=task.tokenizer)
    seconds = trainer.train().metrics["train_runtime"]
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)     # logged at the last step
    return {"name": "TRL SFTTrainer (fp32, completion-only)", "seconds": seconds, "tokens": tokens,
            "loss": val_loss(task, model, val)}


def run_tunesmith(recipe, task, features, val, out_dir) -> dict:
    from transformers import AutoModelForCausalLM

    run = train(recipe, run_dir=out_dir)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    model = AutoModelForCausalLM.from_pretrained(run.path / "model")
    seconds = summary["train_seconds"] - summary["eval_seconds"] - summary.get("checkpoint_seconds", 0.0)
    print(f"tunesmith summary: {json.dumps(summary)}")
    return {"name": "tunesmith text2text (fp32)", "seconds": seconds,
            "tokens": summary["tokens"],
            "loss": val_loss(task, model, val)}


def main():
    from tunesmith.assets.bundled import smollm2
    from tunesmith.device import cpu_flags

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=360, help="pairs read (default 360: --held-out validation, 16 test)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--held-out", type=int, default=48, help="validation pairs the losses are measured on")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-t2t-trl-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    model_dir, data = smollm2(), write_pairs(tmp / "pairs.jsonl", args.rows)
    recipe = load({"task": "text2text", "model": str(model_dir),
                   "data": {"train": str(data), "validation_size": args.held_out, "test_size": 16,
                            "prefix": "summarize: ", "max_length": 64, "max_target_length": 16},
                   "adapt": {"method": "full"},
                   "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": args.lr,
                             "warmup": 0, "precision": "fp32", "eval_every": args.steps,
                             "log_every": max(1, args.steps // 4), "seed": 42, "threads": torch.get_num_threads()},
                   "eval": {"generate": None, "batch_size": 16}})
    task = get_task(recipe)
    tables, _ = load_splits(task, recipe)
    features, val = task.encode(tables["train"].rows), task.encode(tables["validation"].rows)
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{len(features)} training pairs (mean {mean_tokens(features):.1f} tokens, "
          f"{sum(sum(x != -100 for x in f['labels']) for f in features) / len(features):.1f} of them target), "
          f"{args.steps} steps of {args.batch}; SmolLM2-135M-Instruct, full fine-tuning, lr {args.lr}")
    t0 = time.perf_counter()
    results = [run_trl(task, model_dir, features, val, args.steps, args.batch, args.lr, str(tmp / "trl")),
               run_tunesmith(recipe, task, features, val, tmp / "ts")]
    base = results[0]["tokens"] / results[0]["seconds"]
    print(f"\n{'run':<40}{'real tokens':>12}{'seconds':>9}{'tokens/s':>10}{'vs TRL':>8}{'val loss':>10}")
    for r in results:
        tps = r["tokens"] / r["seconds"]
        print(f"{r['name']:<40}{int(r['tokens']):>12,}{r['seconds']:>9.1f}{tps:>10.1f}{tps / base:>8.2f}"
              f"{r['loss']:>10.4f}")
    print(f"\nbase model val loss {val_loss(task, task.load_model(), val):.4f}; total "
          f"{time.perf_counter() - t0:.0f}s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
