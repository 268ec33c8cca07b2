"""Multi-GPU check for DPO (docs/preference.md, "More than one process"): one process, DDP and FSDP on the same
pairs must end at the same held-out metrics. Written for a lent GPU machine; NOT YET RUN (no GPU in the session
that wrote it): run it once there and record what it prints.

    python benchmarks/dpo_multigpu_check.py [--gpus 2] [--steps 20] [--skip-fsdp]

Model: a randomly initialised SmolLM2-135M-shaped Llama (the bundled tokenizer; no download); data: the bundled
`reviews_pairs`; LoRA on every block, bf16 (precision auto), DPO sigmoid, beta 0.1. Runs, each into its own folder:
  single   python -m tunesmith train
  ddp      torchrun --nproc_per_node G -m tunesmith train
  fsdp     accelerate launch --use_fsdp --num_processes G -m tunesmith train (FULL_SHARD, wrap by Llama layer)
Prints each run's exit status, wall time and eval.json (reward_accuracy, reward_margin, loss); DDP must match the
single run closely (same batches, summed loss over all pairs); FSDP may fail where checkpointing meets sharded
parameters: its error is the finding.
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

import yaml

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-fsdp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunesmith.assets.bundled import resolve_model, reviews_pairs

    work = Path(tempfile.mkdtemp(prefix="dpo-gpus-"))
    source = resolve_model("smollm2")
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(work / "model")
    AutoTokenizer.from_pretrained(source).save_pretrained(work / "model")
    recipe = {"task": "causal-lm", "model": str(work / "model"),
              "data": {"train": str(reviews_pairs()), "max_rows": args.steps * 16, "validation_size": 64,
                       "test_size": 128, "max_length": 128},
              "adapt": {"method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS}},
              "train": {"objective": "dpo", "max_steps": args.steps, "batch_size": 16, "learning_rate": 5e-4,
                        "eval_every": args.steps, "seed": 0},
              "eval": {"batch_size": 64}}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    train = ["-m", "tunesmith", "train", str(path), "--run-dir"]
    runs = {"single": [sys.executable, *train, str(work / "single")],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus), *train,
                    str(work / "ddp")]}
    if not args.skip_fsdp:
        runs["fsdp"] = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes",
                        str(args.gpus), "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy",
                        "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                        "--fsdp_use_orig_params", "true", *train, str(work / "fsdp")]
    out = {}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        metrics = work / name / "eval.json"
        out[name] = {"exit": done.returncode, "seconds": round(time.perf_counter() - t0, 1),
                     **({k: json.loads(metrics.read_text()).get(k) for k in ("reward_accuracy", "reward_margin",
                                                                             "loss")} if metrics.exists() else
                        {"error": done.stderr[-2000:]})}
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
