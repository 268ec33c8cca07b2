"""Multi-GPU check for DPO (docs/preference.md, "More than one process"): one process, DDP and FSDP on the same
pairs must end at the same held-out metrics. Written for a lent GPU machine; NOT YET RUN (no GPU in the session
that wrote it): run it once there and record what it prints.

    python benchmarks/dpo_multigpu_check.py [--gpus 2] [--steps 20] [--skip-fsdp] [--timeout 300]

Model: a randomly initialised SmolLM2-135M-shaped Llama (the bundled tokenizer; no download); data: the bundled
`reviews_pairs`; LoRA on every block, bf16 (precision auto), DPO sigmoid, beta 0.1. Runs, each into its own folder:
  single   python -m tunesmith train
  ddp      torchrun --nproc_per_node G -m tunesmith train
  fsdp     accelerate launch --use_fsdp --fsdp_version 1 --num_processes G -m tunesmith train (FULL_SHARD, wrap by
           Llama layer, original parameters kept)
  fsdp2    the same with --fsdp_version 2 (fully_shard: parameters become DTensors)
Prints each run's exit status, wall time and eval.json (reward_accuracy, reward_margin, loss); DDP must match the
single run closely (same batches, summed loss over all pairs). FSDP needs the GPUs: accelerate 1.16 enters FSDP only
for GPU-type process groups, so tunesmith refuses it on a CPU (docs/preference.md). Expected finding, from a CPU probe
that forced accelerate's FSDP2 path on gloo (2 processes, tiny Llama, DPO and SFT + LoRA): training steps run, then
the first best-checkpoint save fails (loop.py Validation -> checkpoint._save_tensors, on the main process alone:
"Attempted to access the data pointer on an invalid python storage": the trainable weights are sharded DTensors).
If that is what the GPUs print too, tunesmith's saves (best checkpoint, step checkpoints, model/) must gather the
weights on every process (accelerator.get_state_dict) before the main process writes, and the final evaluation
must run on unsharded weights; record what this prints either way.
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
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run: a stuck collective must not eat the "
                                                               "lent device's time")
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
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", str(args.gpus),
                  "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
                  "LlamaDecoderLayer"]
        runs["fsdp"] = [*launch, "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                        "--fsdp_use_orig_params", "true", *train, str(work / "fsdp")]
        runs["fsdp2"] = [*launch, "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true", *train,
                         str(work / "fsdp2")]
    out = {}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as stuck:
            done = subprocess.CompletedProcess(cmd, "timeout", "", f"timed out after {args.timeout}s; stderr tail: "
                                               + (stuck.stderr or b"")[-2000:].decode(errors="replace"))
        metrics = work / name / "eval.json"
        out[name] = {"exit": done.returncode, "seconds": round(time.perf_counter() - t0, 1),
                     **({k: json.loads(metrics.read_text()).get(k) for k in ("reward_accuracy", "reward_margin",
                                                                             "loss")} if metrics.exists() else
                        {"error": done.stderr[-2000:]})}
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
