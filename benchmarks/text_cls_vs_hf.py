"""tunesmith's loop vs HF Trainer (its defaults) on the same model, data and hyperparameters, in one process.

    .venv/bin/python benchmarks/text_cls_vs_hf.py [--rows N] [--epochs E] [--skip-bf16]

Both fine-tune the bundled MiniLM on the same Rotten Tomatoes train split and are scored on the same test
split. Prints training samples/s and the ratio, peak memory (resident set growth during the run), test
accuracy, and achieved model GFLOP/s against a matmul peak measured in this process.
Training FLOPs per real token = 6 x non-embedding parameters + 12 x layers x hidden x sequence length.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from tunesmith.pipeline import train
from tunesmith.recipe import load
from tunesmith.splits import load_splits
from tunesmith.tasks import get_task

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms by a thread."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mib = (self.peak - self.base) / 2**20


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 4, blocks: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul on this machine's threads: the best of `blocks` timings of `reps` matmuls
    (a peak is what the machine can do; a slow block is interference, and a low peak would flatter the runs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * reps / best / 1e9


def flops_per_token(model, seq_len: float) -> float:
    cfg = model.config
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_emb = sum(p.numel() for p in model.parameters()) - emb
    return 6 * non_emb + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def run_hf(recipe, tables, task, out_dir: str) -> dict:
    """HF Trainer with its defaults; only the recipe's hyperparameters are set."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from tunesmith.assets.bundled import resolve_model

    cfg = recipe.train
    path = resolve_model(recipe.model.name)
    tok = AutoTokenizer.from_pretrained(path)
    set_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, **task.label_config)

    def encode(rows):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=recipe.data.max_length)
        return [{"input_ids": i, "attention_mask": m, "labels": task.label_id(r)}
                for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]

    train_set, test_set = encode(tables["train"].rows), encode(tables["test"].rows)
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=cfg.batch_size,
                             per_device_eval_batch_size=recipe.eval.batch_size, learning_rate=cfg.learning_rate,
                             num_train_epochs=cfg.epochs, weight_decay=cfg.weight_decay, warmup_steps=
                             round(cfg.warmup * len(train_set) / cfg.batch_size * cfg.epochs),
                             lr_scheduler_type=cfg.scheduler, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                             save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok))
    with PeakRSS() as mem:
        metrics = trainer.train().metrics
    preds = trainer.predict(test_set)
    acc = float((preds.predictions.argmax(-1) == preds.label_ids).mean())
    tokens = sum(len(f["input_ids"]) for f in train_set) * cfg.epochs
    return {"name": "HF Trainer (defaults, fp32)", "seconds": metrics["train_runtime"],
            "samples": len(train_set) * cfg.epochs, "tokens": tokens, "mem": mem.mib, "accuracy": acc,
            "model": model, "precision": "fp32"}


def run_tunesmith(recipe, out_dir: str, precision: str, fast_dropout: bool = True) -> dict:
    recipe = recipe.model_copy(deep=True)
    recipe.train.precision = precision
    recipe.train.fast_dropout = fast_dropout
    with PeakRSS() as mem:
        run = train(recipe, run_dir=out_dir)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    result = json.loads((run.path / "eval.json").read_text())
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(run.path / "model")
    name = f"tunesmith ({precision}{'' if fast_dropout else ', torch dropout'})"
    return {"name": name, "seconds": summary["train_seconds"] - summary["eval_seconds"],
            "samples": summary["samples"], "tokens": summary["tokens"], "mem": mem.mib,
            "accuracy": result["accuracy"], "model": model, "precision": precision}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="cap on training rows (default: all ~9.8k)")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--skip-bf16", action="store_true", help="only fp32 runs")
    ap.add_argument("--torch-dropout", action="store_true",
                    help="also run tunesmith fp32 with torch's dropout masks (train.fast_dropout=false)")
    args = ap.parse_args()
    overrides = [f"train.epochs={args.epochs}", "train.min_steps=0", "eval.before=false"]   # epochs as HF runs them
    if args.rows:
        overrides.append(f"data.max_rows={args.rows}")
    recipe = load(Path(__file__).parent.parent / "tunesmith" / "recipes" / "rotten_tomatoes.yaml", overrides)
    task = get_task(recipe)
    tables, _ = load_splits(task, recipe)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; train {len(tables['train']):,} rows, "
          f"test {len(tables['test']):,}; batch {recipe.train.batch_size}, lr {recipe.train.learning_rate}, "
          f"max_length {recipe.data.max_length}, epochs {args.epochs}")
    import os

    from tunesmith.device import choose_precision, cpu_flags
    simd = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"cpu flags: {' '.join(simd) or 'none of avx2/avx512/amx'}; load average {os.getloadavg()[0]:.2f}")
    limits = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
              if k in os.environ}           # an AVX2 machine emulated on a newer CPU: kernels limited to AVX2
    print(f"torch kernels: {torch.backends.cpu.get_cpu_capability()}" + (f" (limited by {limits})" if limits else ""))
    bf16 = not args.skip_bf16 and choose_precision("auto", torch.device("cpu"))[0] == "bf16"
    # measure only the precisions that run: a bf16 matmul on an AVX2-only CPU alone takes minutes
    peaks = {"fp32": matmul_peak(torch.float32), **({"bf16": matmul_peak(torch.bfloat16)} if bf16 else {})}
    print("matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))

    tmp = tempfile.mkdtemp(prefix="bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # run folders: GBs per run
    results = [run_hf(recipe, tables, task, f"{tmp}/hf"), run_tunesmith(recipe, f"{tmp}/ts-fp32", "fp32")]
    if args.torch_dropout:
        results.append(run_tunesmith(recipe, f"{tmp}/ts-fp32-torch-dropout", "fp32", fast_dropout=False))
    if bf16:
        results.append(run_tunesmith(recipe, f"{tmp}/ts-auto", "auto"))
        results[-1]["precision"] = "bf16"
    elif not args.skip_bf16:
        print(f"tunesmith auto precision here: {choose_precision('auto', torch.device('cpu'))[1]}; no bf16 run")

    after = {k: matmul_peak(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[k])) for k in peaks}
    print("matmul peak after the runs: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in after.items())
          + "; the higher of before and after is used")
    peaks = {k: max(v, after[k]) for k, v in peaks.items()}
    base = results[0]
    print(f"\n{'run':<38}{'samples/s':>10}{'ratio':>7}{'tokens/s':>10}{'GFLOP/s':>9}{'% peak':>8}"
          f"{'peak MiB':>10}{'accuracy':>10}")
    for r in results:
        seq = r["tokens"] / r["samples"]
        gflops = flops_per_token(r["model"], seq) * r["tokens"] / r["seconds"] / 1e9
        sps = r["samples"] / r["seconds"]
        print(f"{r['name']:<38}{sps:>10.1f}{sps / (base['samples'] / base['seconds']):>7.2f}"
              f"{r['tokens'] / r['seconds']:>10.0f}{gflops:>9.1f}{100 * gflops / peaks[r['precision']]:>8.1f}"
              f"{r['mem']:>10.0f}{r['accuracy']:>10.4f}")
    print("\nratio: samples/s relative to HF Trainer; % peak: achieved model GFLOP/s over the matmul peak of the "
          "run's precision; peak MiB: resident memory growth during training")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
