"""10 trials x 3 epochs: `tunesmith search` vs HF Trainer.hyperparameter_search(backend="optuna"), one process.

    .venv/bin/python benchmarks/search_vs_hf.py [--rows 2000] [--trials 10] [--epochs 3] [--pruner hyperband]

MiniLM (bundled) with embeddings and the bottom 4 of 6 blocks frozen and dropout 0 (so tunesmith's frozen-
feature cache applies), Rotten Tomatoes rows (the same train / validation rows for both), max_length 64, the
same space: learning rate log [1e-5, 1e-3], batch size {16, 32}, weight decay [0, 0.1], warmup [0, 0.2].
HF: one evaluation per epoch, objective = validation accuracy after the last epoch (its default). tunesmith:
TPE + pruning (--pruner none to switch it off), scored on its best checkpoint. Prints wall seconds of each,
the ratio and each one's best validation accuracy, and the load average (a shared machine slows both).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPACE = {"train.learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
         "train.batch_size": {"choices": [16, 32]},
         "train.weight_decay": {"low": 0.0, "high": 0.1},
         "train.warmup": {"low": 0.0, "high": 0.2}}


def recipe(args) -> dict:
    return {"task": "text-classification", "name": "rt-search", "model": {"name": "minilm", "dropout": 0.0},
            "data": {"train": "rotten_tomatoes", "validation_size": args.validation, "test_size": 500,
                     "max_rows": args.rows, "max_length": 64},
            "adapt": {"method": "full", "freeze_embeddings": True, "freeze_layers": 4},
            "train": {"epochs": args.epochs, "min_steps": 0, "seed": 0, "precision": "fp32", "log_every": 50},
            "search": {"trials": args.trials, "pruner": args.pruner, "space": SPACE}}


def run_tunesmith(args, folder) -> tuple[float, float]:
    import tunesmith as ts
    from tunesmith.selection.search import search

    t0 = time.perf_counter()
    out = search(ts.load_recipe(recipe(args)), folder, say=lambda *a: None)
    return time.perf_counter() - t0, out["best"]["score"]


def run_hf(args, folder) -> tuple[float, float]:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    import tunesmith as ts
    from tunesmith.assets.bundled import resolve_model
    from tunesmith.splits import load_splits
    from tunesmith.tasks import get_task

    rec = ts.load_recipe(recipe(args))
    task = get_task(rec)
    task.setup()
    tables, _ = load_splits(task, rec)                       # the same rows tunesmith trains and validates on
    enc = {s: [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in task.encode(tables[s].rows)]
           for s in ("train", "validation")}
    path = resolve_model("minilm")

    def model_init(trial=None):
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(task.labels), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        for name, p in m.named_parameters():
            if name.startswith("bert.embeddings") or any(name.startswith(f"bert.encoder.layer.{i}.") for i in range(4)):
                p.requires_grad_(False)
        return m

    def collate(features):
        batch = task.collate(features)
        return batch

    def hp_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),
                "per_device_train_batch_size": trial.suggest_categorical("per_device_train_batch_size", [16, 32]),
                "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
                "warmup_steps": trial.suggest_float("warmup_steps", 0.0, 0.2)}

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    targs = TrainingArguments(output_dir=str(folder), num_train_epochs=args.epochs, eval_strategy="epoch",
                              save_strategy="no", logging_steps=50, report_to=[], seed=0, use_cpu=True,
                              per_device_eval_batch_size=64, disable_tqdm=True)
    trainer = Trainer(model_init=model_init, args=targs, train_dataset=enc["train"], eval_dataset=enc["validation"],
                      data_collator=collate, compute_metrics=metrics)
    t0 = time.perf_counter()
    best = trainer.hyperparameter_search(direction="maximize", backend="optuna", hp_space=hp_space,
                                         n_trials=args.trials, compute_objective=lambda m: m["eval_accuracy"])
    return time.perf_counter() - t0, best.objective


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--validation", type=int, default=500)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pruner", default="hyperband", choices=["hyperband", "halving", "none"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load0 = os.getloadavg()
        ts_s, ts_acc = run_tunesmith(args, f"{tmp}/ts")
        hf_s, hf_acc = run_hf(args, f"{tmp}/hf")
        load1 = os.getloadavg()
    print(f"{args.trials} trials x {args.epochs} epochs, {args.rows} train rows, {args.validation} validation rows, "
          f"pruner {args.pruner}; load average before {load0[0]:.2f}, after {load1[0]:.2f}, {os.cpu_count()} cpus")
    print(f"{'':<26}{'seconds':>10}{'best val accuracy':>20}")
    print(f"{'tunesmith search':<26}{ts_s:>10.1f}{ts_acc:>20.4f}")
    print(f"{'HF Trainer + optuna':<26}{hf_s:>10.1f}{hf_acc:>20.4f}")
    print(f"speed-up: {hf_s / ts_s:.1f}x")


if __name__ == "__main__":
    main()
