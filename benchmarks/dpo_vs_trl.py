"""DPO: tunesmith vs TRL's DPOTrainer, same model, LoRA, data, steps, precision (fp32), one process.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/dpo_vs_trl.py [--steps S] [--batch B] [--test N]
                                                                    [--model smollm2|random] [--out FILE]

Model: the bundled SmolLM2-135M-Instruct (or `random`: a randomly initialised model of its shape). LoRA r 16 on
the attention and MLP projections of the top 15 of 30 blocks (the chat demo's), lr 5e-4, linear schedule, 10%
warmup, weight decay 0.01, grad-norm clip 1.0, beta 0.1, sigmoid loss. Data: the first S x B pairs of the bundled
`reviews_pairs` (tunesmith/assets/bundled.py: one epoch, every pair seen once by both) and N held-out pairs after
them. TRL: its defaults otherwise (the reference by disabling the adapter at every step, full-vocabulary logits,
padded batches in random order). tunesmith: reference log-probs computed once before training (counted in its
time), the LM head only at answer positions, batches grouped by length.
Timed: training alone, from the first step to the last (tunesmith: plus its reference pass); model loading,
tokenisation and evaluation excluded. Tokens: the real (non-pad) tokens of every pair's chosen and rejected
sequences, the same count for both. Held-out reward accuracy: one evaluation function for both trained models
(tunesmith's Preference.evaluate, fp32; the reference the adapter-disabled / base model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import tunesmith as ts  # noqa: E402
from tunesmith.assets.bundled import resolve_model, reviews_pairs  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402
from tunesmith.tasks.preference import Preference  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def machine() -> str:
    flags = subprocess.run("grep -o 'avx512[a-z_0-9]*\\|avx2' /proc/cpuinfo | sort -u | tr '\\n' ' '",
                           shell=True, capture_output=True, text=True).stdout.strip()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"cpu flags: {flags or 'none'}; {load}; torch threads {torch.get_num_threads()}"


def recipe(model: str, files: dict, args) -> dict:
    return {"task": "causal-lm", "model": model,
            "data": {"train": files["train"], "validation": files["test"], "test": files["test"], "max_length": 128},
            "adapt": {"method": "lora", "freeze_layers": args.freeze,
                      "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS}},
            "train": {"objective": "dpo", "dpo": {"beta": 0.1}, "max_steps": args.steps, "batch_size": args.batch,
                      "learning_rate": args.lr, "warmup": 0.1, "weight_decay": 0.01, "precision": "fp32",
                      "eval_every": args.steps, "log_every": 5, "seed": 42},
            "eval": {"batch_size": 32}}


def run_tunesmith(model: str, files: dict, args, work: Path) -> dict:
    spent = {}
    precompute = Preference.precompute

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        precompute(self, *a, **kw)
        spent["reference"] = time.perf_counter() - t0

    Preference.precompute = timed
    try:
        run = ts.train(ts.load_recipe(recipe(model, files, args)), run_dir=work / "tunesmith")
    finally:
        Preference.precompute = precompute
    summary = [r for r in run.history if r.get("summary")][-1]
    return {"seconds": summary["train_seconds"] - summary.get("eval_seconds", 0) - summary.get(
        "checkpoint_seconds", 0) + spent["reference"], "reference_seconds": spent["reference"], "run": run}


def run_trl(model_dir: str, rows: list[dict], args, work: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.start = getattr(self, "start", None) or time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.end = time.perf_counter()

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    cfg = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                    learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=max(1, round(0.1 * args.steps)),
                    weight_decay=0.01, max_grad_norm=1.0, beta=0.1, loss_type="sigmoid", max_length=128,
                    logging_steps=5, save_strategy="no", eval_strategy="no", report_to=[], bf16=False, fp16=False,
                    use_cpu=True, seed=42, dataloader_num_workers=0, gradient_checkpointing=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
                      layers_to_transform=list(range(args.freeze, model.config.num_hidden_layers)))
    clock = Clock()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=lora,
                         callbacks=[clock])
    trainer.train()
    return {"seconds": clock.end - clock.start, "model": trainer.model}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "random"])
    ap.add_argument("--only", default="both", choices=["both", "tunesmith", "trl"])
    ap.add_argument("--model-dir", default=None, help="another causal LM folder (a quick check of the script)")
    ap.add_argument("--freeze", type=int, default=15, help="blocks without LoRA, from the bottom (SmolLM2: 30)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    model_dir = args.model_dir or resolve_model("smollm2")
    if args.model == "random":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(work / "random")
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(work / "random")
        model_dir = str(work / "random")
    lines = open(reviews_pairs()).read().splitlines()
    rows = [json.loads(x) for x in lines[:args.steps * args.batch + args.test]]
    train_rows, test_rows = rows[:args.steps * args.batch], rows[args.steps * args.batch:]
    files = {}
    for split, part in (("train", train_rows), ("test", test_rows)):
        files[split] = str(work / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in part))

    task = get_task(ts.load_recipe(recipe(model_dir, files, args)))
    tokens = sum(task.length(f) for f in task.encode(train_rows))
    test = task.encode(test_rows)
    out = {"machine": machine(), "model": args.model, "steps": args.steps, "batch_pairs": args.batch,
           "train_pairs": len(train_rows), "test_pairs": len(test_rows), "real_tokens": tokens}

    def held_out(model) -> dict:
        model.eval()
        with torch.no_grad():
            r = task.evaluate(model, [{k: v for k, v in f.items() if k != "reference"} for f in test], 32)
        return {k: round(r[k], 4) for k in ("reward_accuracy", "reward_margin", "loss", "logp_accuracy")}

    if args.only in ("both", "tunesmith"):
        got = run_tunesmith(model_dir, files, args, work)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                            got["run"].model_dir / "adapter")
        out["tunesmith"] = {"seconds": round(got["seconds"], 1), "reference_seconds": round(got["reference_seconds"],
                                                                                             1),
                            "tokens_per_s": round(tokens / got["seconds"], 1), **held_out(trained)}
        print(json.dumps(out["tunesmith"]), flush=True)
    if args.only in ("both", "trl"):
        got = run_trl(model_dir, train_rows, args, work)
        out["trl"] = {"seconds": round(got["seconds"], 1), "tokens_per_s": round(tokens / got["seconds"], 1),
                      **held_out(got["model"])}
        print(json.dumps(out["trl"]), flush=True)
    if "tunesmith" in out and "trl" in out:
        out["speedup"] = round(out["tunesmith"]["tokens_per_s"] / out["trl"]["tokens_per_s"], 2)
    out["machine_after"] = machine()
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
