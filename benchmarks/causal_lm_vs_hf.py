"""tunesmith vs HF Trainer on chat/instruction tuning of a causal LM, same model and data, in one process.

    .venv/bin/python benchmarks/causal_lm_vs_hf.py [--rows N] [--steps S] [--batch B] [--skip-bf16]

Both train the bundled SmolLM2-135M-Instruct with the same LoRA (the demo recipe's: r 16 on q/k/v/o), learning
rate, warmup and linear schedule, on the same training conversations of the bundled reviews_chat data, with the
same prompt-masked labels (the causal-lm task's own encoding), for the same number of optimizer steps of about
B conversations each. HF Trainer pads each batch (DataCollatorForSeq2Seq) and runs with its defaults (fp32 on
CPU; a bf16=True run is added where the CPU has native bf16); tunesmith packs rows (train.packing) and applies
the LM head only at label positions. TRL's SFTTrainer is used instead of Trainer when trl is installed.

Prints real (non-pad) training tokens/s and the ratio to HF Trainer's default run, peak resident memory growth
during training, and after training the token-weighted loss over the assistant tokens of the same 200 held-out
validation conversations (fp32, one evaluation function for every run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_cls_vs_hf import PeakRSS  # noqa: E402

from tunesmith.recipe import load  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402
from tunesmith.train import load_splits, train  # noqa: E402

RECIPE = Path(__file__).parent.parent / "tunesmith" / "recipes" / "reviews_chat.yaml"


def validation_loss(task, model, features) -> float:
    model.eval()
    with torch.no_grad():
        return task.evaluate(model, features, 16)["loss"]


def run_hf(recipe, task, train_rows, val_features, steps: int, batch: int, out_dir: str, bf16: bool) -> dict:
    """HF Trainer (or TRL's SFTTrainer) with its defaults; only the recipe's hyperparameters are set."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
    from tunesmith.assets import resolve_model

    cfg, lora = recipe.train, recipe.adapt.lora
    set_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(recipe.model.name))
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    train_set = [{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"]), "labels": f["labels"]}
                 for f in task.encode(train_rows)]
    pad = DataCollatorForSeq2Seq(task.tokenizer, label_pad_token_id=-100, padding=True)
    seen = {"tokens": 0}

    def collate(features):                              # counts real (non-pad) tokens, then pads
        seen["tokens"] += sum(len(f["input_ids"]) for f in features)
        return pad(features)

    args = dict(output_dir=out_dir, per_device_train_batch_size=batch, learning_rate=cfg.learning_rate,
                max_steps=steps, weight_decay=cfg.weight_decay, warmup_steps=round(cfg.warmup * steps),
                lr_scheduler_type=cfg.scheduler, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, bf16=bf16,
                save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=steps,
                use_cpu=not torch.cuda.is_available())     # required for bf16=True on a CPU
    try:
        from trl import SFTConfig, SFTTrainer
        name = "TRL SFTTrainer"
        trainer = SFTTrainer(model=model, args=SFTConfig(**args, dataset_kwargs={"skip_prepare_dataset": True}),
                             train_dataset=train_set, processing_class=task.tokenizer, data_collator=collate)
    except ImportError:
        name = "HF Trainer"
        trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=train_set,
                          processing_class=task.tokenizer, data_collator=collate)
    with PeakRSS() as mem:
        metrics = trainer.train().metrics
    return {"name": f"{name} ({'bf16' if bf16 else 'defaults, fp32'})", "seconds": metrics["train_runtime"],
            "tokens": seen["tokens"], "mem": mem.mib, "loss": validation_loss(task, model, val_features)}


def run_tunesmith(recipe, task, val_features, steps: int, batch: int, mean_len: float, out_dir: str,
                  precision: str) -> dict:
    from transformers import AutoModelForCausalLM

    recipe = recipe.model_copy(deep=True)
    recipe.train.precision, recipe.train.max_steps = precision, steps
    recipe.train.packing = True
    rows_per_step = max(1, round(batch * mean_len / recipe.train.pack_length / 0.95))   # ~batch conversations
    recipe.train.batch_size = rows_per_step
    with PeakRSS() as mem:
        run = train(recipe, run_dir=out_dir)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    model = AutoModelForCausalLM.from_pretrained(run.path / "model")
    return {"name": f"tunesmith ({precision}, packed x{rows_per_step})",
            "seconds": summary["train_seconds"] - summary["eval_seconds"], "tokens": summary["tokens"],
            "mem": mem.mib, "loss": validation_loss(task, model, val_features)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400, help="training conversations available (default 400)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps for every run (default 12)")
    ap.add_argument("--batch", type=int, default=8, help="conversations per step (default 8)")
    ap.add_argument("--skip-bf16", action="store_true", help="only fp32 runs")
    args = ap.parse_args()
    recipe = load(RECIPE, [f"data.max_rows={args.rows}", "data.validation_size=200", "eval.before=false",
                           "eval.generate=null", f"train.eval_every={args.steps}"])
    task = get_task(recipe)
    tables, _ = load_splits(task, recipe)
    recipe.train.packing = False                    # task.encode: one feature per conversation
    val_features = task.encode(tables["validation"].rows)
    train_rows = tables["train"].rows
    lengths = [len(task.encode_one(task.messages(r))[0]) for r in train_rows]
    mean_len = sum(lengths) / len(lengths)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(train_rows)} training conversations "
          f"(mean {mean_len:.0f} tokens), {args.steps} steps of ~{args.batch}; lr {recipe.train.learning_rate}, "
          f"LoRA r={recipe.adapt.lora.r} on {recipe.adapt.lora.target_modules}")

    tmp = tempfile.mkdtemp(prefix="bench-lm-")
    t0 = time.perf_counter()
    results = [run_hf(recipe.model_copy(deep=True), task, train_rows, val_features, args.steps, args.batch,
                      f"{tmp}/hf", bf16=False),
               run_tunesmith(recipe, task, val_features, args.steps, args.batch, mean_len, f"{tmp}/ts-fp32", "fp32")]
    if not args.skip_bf16:
        from tunesmith.loop import choose_precision
        mode, why = choose_precision("auto", torch.device("cpu"))
        if mode == "bf16":
            results.append(run_hf(recipe.model_copy(deep=True), task, train_rows, val_features, args.steps,
                                  args.batch, f"{tmp}/hf-bf16", bf16=True))
            results.append(run_tunesmith(recipe, task, val_features, args.steps, args.batch, mean_len,
                                         f"{tmp}/ts-bf16", "bf16"))
        else:
            print(f"no bf16 runs: {why}")
    base = results[0]["tokens"] / results[0]["seconds"]
    print(f"\n{'run':<36}{'real tokens':>12}{'seconds':>9}{'tokens/s':>10}{'ratio':>7}{'peak MiB':>10}{'val loss':>10}")
    for r in results:
        tps = r["tokens"] / r["seconds"]
        print(f"{r['name']:<36}{r['tokens']:>12,}{r['seconds']:>9.1f}{tps:>10.1f}{tps / base:>7.2f}"
              f"{r['mem']:>10.0f}{r['loss']:>10.4f}")
    print(f"\nratio: real (non-pad) training tokens/s relative to the first row; val loss: token-weighted loss "
          f"over the assistant tokens of {len(val_features)} validation conversations (base model: "
          f"{validation_loss(task, task.load_model()[0], val_features):.4f}); total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
