"""tunesmith vs HF Trainer and TRL's SFTTrainer on chat/instruction tuning of a causal LM, same model and data,
in one process.

    .venv/bin/python benchmarks/causal_lm_vs_hf.py [--rows N] [--steps S] [--batch B] [--skip-bf16]
                                                   [--baseline hf|trl|both] [--ablate]

All three train the bundled SmolLM2-135M-Instruct with the same LoRA (the demo recipe's: r 16 on the attention
and MLP projections of the top 15 of 30 blocks), learning rate, warmup and linear schedule, on the same
training conversations of the bundled reviews_chat data, with the same prompt-masked labels (the causal-lm
task's own encoding), for the same number of optimizer steps of about B conversations each. HF Trainer pads
each batch (DataCollatorForSeq2Seq) and runs with its defaults (fp32 on CPU; a bf16=True run is added where the
CPU has native bf16). TRL's SFTTrainer packs best-fit-decreasing ("bfd") into one padding-free row of the same
length as tunesmith's per step, gradient checkpointing off. tunesmith packs one row of ~B conversations per step
(train.packing) and applies the LM head only at label positions.

Prints real (non-pad) training tokens/s and its ratio to each baseline at the same precision; peak resident memory while
training, above the level before the run (model loading included); and after training the token-weighted loss
over the assistant tokens of the same 200 held-out validation conversations (fp32, one evaluation function).
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_cls_vs_hf import PeakRSS  # noqa: E402

from tunesmith.pipeline import train
from tunesmith.recipe import load  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402

RECIPE = Path(__file__).parent.parent / "tunesmith" / "recipes" / "reviews_chat.yaml"


def release_memory() -> None:
    """Return freed heap to the OS so each run's resident-memory growth is measured from a clean level."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def validation_loss(task, model, features) -> float:
    model.eval()
    with torch.no_grad():
        return task.evaluate(model, features, 16)["loss"]


def lora_model(recipe):
    """The recipe's model with its LoRA on the top blocks (as adapt.freeze_layers does), and a counter of the real
    (non-pad) tokens of each training forward: the attention mask's ones, or every id of a padding-free row."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from tunesmith.assets.bundled import resolve_model

    lora = recipe.adapt.lora
    set_seed(recipe.train.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(recipe.model.name))
    layers = range(recipe.adapt.freeze_layers, model.config.num_hidden_layers)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, layers_to_transform=list(layers),
                                             task_type="CAUSAL_LM"))
    seen = {"tokens": 0}

    def count(module, args, kwargs):
        if module.training:
            mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
            seen["tokens"] += int(mask.sum()) if mask is not None else ids.numel()

    model.register_forward_pre_hook(count, with_kwargs=True)
    return model, seen


def common_args(recipe, steps: int, out_dir: str, bf16: bool) -> dict:
    """TrainingArguments both baselines share: the recipe's hyperparameters, no checkpoints, no reporting."""
    cfg = recipe.train
    return dict(output_dir=out_dir, learning_rate=cfg.learning_rate, max_steps=steps, weight_decay=cfg.weight_decay,
                warmup_steps=round(cfg.warmup * steps), lr_scheduler_type=cfg.scheduler,
                max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, bf16=bf16, save_strategy="no", report_to="none",
                disable_tqdm=True, logging_steps=steps,
                use_cpu=not torch.cuda.is_available())     # required for bf16=True on a CPU


def measure(name: str, trainer, model, seen: dict, mem, task, val_features) -> dict:
    with PeakRSS() as during:
        metrics = trainer.train().metrics
    mem.__exit__(None, None, None)
    return {"name": name, "seconds": metrics["train_runtime"], "tokens": seen["tokens"],
            "mem": (during.peak - mem.base) / 2**20, "loss": validation_loss(task, model, val_features)}


def run_hf(recipe, task, train_rows, val_features, steps: int, batch: int, out_dir: str, bf16: bool) -> dict:
    """HF Trainer with its defaults; only the recipe's hyperparameters (and its LoRA) are set."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    release_memory()
    mem = PeakRSS().__enter__()                         # model loading counts, as it does for tunesmith
    model, seen = lora_model(recipe)
    train_set = [{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"]), "labels": f["labels"]}
                 for f in task.encode(train_rows)]
    collate = DataCollatorForSeq2Seq(task.tokenizer, label_pad_token_id=-100, padding=True)
    args = TrainingArguments(per_device_train_batch_size=batch, **common_args(recipe, steps, out_dir, bf16))
    trainer = Trainer(model=model, args=args, train_dataset=train_set, processing_class=task.tokenizer,
                      data_collator=collate)
    return measure(f"HF Trainer ({'bf16' if bf16 else 'defaults, fp32'})", trainer, model, seen, mem, task,
                   val_features)


def run_trl(recipe, task, train_rows, val_features, steps: int, pack_length: int, out_dir: str, bf16: bool) -> dict:
    """TRL's SFTTrainer: the same LoRA on the same prompt-masked features (a "labels" column, so TRL trains on the
    answers only), its best-fit-decreasing packing into rows of pack_length tokens, one row a step, padding-free.
    Gradient checkpointing off (TRL's default is on; off is faster on this model); precision set as tunesmith's."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    release_memory()
    mem = PeakRSS().__enter__()
    model, seen = lora_model(recipe)
    data = Dataset.from_list([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in task.encode(train_rows)])
    args = SFTConfig(per_device_train_batch_size=1, packing=True, packing_strategy="bfd", padding_free=True,
                     max_length=pack_length, gradient_checkpointing=False, **common_args(recipe, steps, out_dir, bf16))
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=task.tokenizer)
    return measure(f"TRL SFTTrainer ({'bf16' if bf16 else 'fp32'}, bfd)", trainer, model, seen, mem, task,
                   val_features)


def run_tunesmith(recipe, task, val_features, steps: int, batch: int, mean_len: float, out_dir: str,
                  precision: str, plain: bool = False) -> dict:
    """plain: without attention per example and cheap dropout masks (the masked row, torch's masks)."""
    from transformers import AutoModelForCausalLM

    import tunesmith.tasks.causal_lm as causal_lm

    recipe = recipe.model_copy(deep=True)
    recipe.train.precision, recipe.train.max_steps = precision, steps
    recipe.train.fast_dropout = not plain
    recipe.train.packing, recipe.train.batch_size = True, 1     # one packed row of ~batch conversations a step
    recipe.train.pack_length = round(batch * mean_len / 0.96)  # as main() gives TRL's max_length
    import tunesmith.loop as loop

    fit, during = loop.fit, PeakRSS()

    def measured_fit(*args, **kwargs):                  # peak while training, as for HF's trainer.train()
        with during:
            return fit(*args, **kwargs)

    release_memory()
    loop.fit, segments = measured_fit, causal_lm.use_segment_attention
    if plain:
        causal_lm.use_segment_attention = lambda model: False
    try:
        with PeakRSS() as mem:
            run = train(recipe, run_dir=out_dir)
    finally:
        loop.fit, causal_lm.use_segment_attention = fit, segments
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next(x for x in lines if x.get("summary"))
    model = AutoModelForCausalLM.from_pretrained(run.path / "model")
    return {"name": f"tunesmith ({precision}, packed{', plain' if plain else ''})",
            "seconds": summary["train_seconds"] - summary["eval_seconds"], "tokens": summary["tokens"],
            "mem": (during.peak - mem.base) / 2**20, "loss": validation_loss(task, model, val_features)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400, help="training conversations available (default 400)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps for every run (default 12)")
    ap.add_argument("--batch", type=int, default=8, help="conversations per step (default 8)")
    ap.add_argument("--skip-bf16", action="store_true", help="only fp32 runs")
    ap.add_argument("--baseline", choices=["hf", "trl", "both"], default="both",
                    help="HF Trainer (padded batches), TRL's SFTTrainer (packed, padding-free), or both")
    ap.add_argument("--ablate", action="store_true", help="also run tunesmith plain: attention over the whole "
                    "masked row instead of per example, torch's dropout masks (train.fast_dropout=false)")
    args = ap.parse_args()
    if args.baseline != "hf":
        import importlib.util
        if importlib.util.find_spec("trl") is None:
            raise SystemExit("the TRL baseline needs trl: pip install --no-deps trl==1.16.0 (or --baseline hf)")
    recipe = load(RECIPE, [f"data.max_rows={args.rows}", "data.validation_size=200", "eval.before=false",
                           "eval.generate=null", f"train.eval_every={args.steps}"])
    task = get_task(recipe)
    tables, _ = load_splits(task, recipe)
    recipe.train.packing = False                    # task.encode: one feature per conversation
    val_features = task.encode(tables["validation"].rows)
    train_rows = tables["train"].rows
    lengths = [len(task.encode_one(task.messages(r))[0]) for r in train_rows]
    mean_len = sum(lengths) / len(lengths)
    from tunesmith.device import cpu_flags
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; load average {os.getloadavg()[0]:.2f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(train_rows)} training conversations "
          f"(mean {mean_len:.0f} tokens), {args.steps} steps of ~{args.batch}; lr {recipe.train.learning_rate}, "
          f"LoRA r={recipe.adapt.lora.r} on {recipe.adapt.lora.target_modules}")

    tmp = tempfile.mkdtemp(prefix="bench-lm-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # run folders: GBs per run
    t0 = time.perf_counter()
    pack_length = round(args.batch * mean_len / 0.96)   # best-fit decreasing fills rows ~96%
    precisions = ["fp32"]
    if not args.skip_bf16:
        from tunesmith.device import choose_precision
        mode, why = choose_precision("auto", torch.device("cpu"))
        precisions += ["bf16"] if mode == "bf16" else []
        if mode != "bf16":
            print(f"no bf16 runs: {why}")
    results = []
    for precision in precisions:
        bf16 = precision == "bf16"
        if args.baseline in ("hf", "both"):
            results.append(run_hf(recipe.model_copy(deep=True), task, train_rows, val_features, args.steps,
                                  args.batch, f"{tmp}/hf-{precision}", bf16=bf16))
        if args.baseline in ("trl", "both"):
            results.append(run_trl(recipe.model_copy(deep=True), task, train_rows, val_features, args.steps,
                                   pack_length, f"{tmp}/trl-{precision}", bf16=bf16))
        for plain in ([True] if args.ablate else []) + [False]:
            results.append(run_tunesmith(recipe, task, val_features, args.steps, args.batch, mean_len,
                                         f"{tmp}/ts-{precision}{'-plain' if plain else ''}", precision, plain))
            results[-1]["precision"] = precision
    base = {}
    print(f"\n{'run':<40}{'real tokens':>12}{'seconds':>9}{'tokens/s':>10}{'vs HF':>7}{'vs TRL':>8}"
          f"{'peak MiB':>10}{'val loss':>10}")
    for r in results:
        tps = r["tokens"] / r["seconds"]
        for kind in ("HF", "TRL"):
            if r["name"].startswith(kind):
                base[(kind, "bf16" if "bf16" in r["name"] else "fp32")] = tps
        ratio = {k: (f"{tps / base[(k, r['precision'])]:.2f}" if (k, r.get("precision")) in base else "")
                 for k in ("HF", "TRL")}
        print(f"{r['name']:<40}{int(r['tokens']):>12,}{r['seconds']:>9.1f}{tps:>10.1f}{ratio['HF']:>7}{ratio['TRL']:>8}"
              f"{r['mem']:>10.0f}{r['loss']:>10.4f}")
    labelled = sum(sum(x != -100 for x in f["labels"]) for f in val_features)
    total = sum(len(f["input_ids"]) for f in val_features)
    print(f"\nratios: tunesmith's real (non-pad) training tokens/s over the baseline's at the same precision; "
          f"val loss: token-weighted loss over the assistant tokens of {len(val_features)} validation conversations "
          f"({labelled} of {total} tokens are labelled; base model: "
          f"{validation_loss(task, task.load_model(), val_features):.4f}); total {time.perf_counter() - t0:.0f}s; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
