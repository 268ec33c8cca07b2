"""Offline preference-tuning demo: SFT then DPO (or ORPO) on the bundled SmolLM2-135M-Instruct with LoRA.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/dpo_demo.py [--sft-rows N] [--pairs N] [--test N]
                                                                  [--objective dpo|orpo] [--out FILE]

Data, all bundled: `reviews_chat` (a Rotten Tomatoes snippet in, the one-word verdict `fresh` / `rotten` out) for
SFT, and `reviews_pairs` (tunesmith/assets/bundled.py) for the preference stage: the same prompts, chosen = the
one-word verdict (the house format), rejected = the wrong verdict in one word, or the right one in prose. The
preference stage starts from the SFT run's merged model (its reference for DPO). Reported on the same held-out
pairs for the base model, after SFT and after SFT + DPO: exact match of greedy answers (4 new tokens) against the
chosen answer (format and verdict both right), logp_accuracy (the model's own preference: chosen has the higher
per-token log-prob), and DPO's held-out reward accuracy and margin (0 before DPO: policy == reference).
A short SFT stage on purpose: it leaves the format half learnt, so the preference stage has something to add.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import tunesmith as ts  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402

RECIPES = Path(__file__).parent.parent / "tunesmith" / "recipes"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
KEYS = ("exact_match", "logp_accuracy", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")


def machine() -> str:
    flags = subprocess.run("grep -o 'avx512[a-z_0-9]*\\|avx2' /proc/cpuinfo | sort -u | tr '\\n' ' '",
                           shell=True, capture_output=True, text=True).stdout.strip()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"cpu flags: {flags or 'none'}; {load}; torch threads {torch.get_num_threads()}"


def pair_recipe(model: str, args, run_threads: int | None) -> dict:
    return {"task": "causal-lm", "name": f"reviews-{args.objective}", "model": model,
            "data": {"train": "reviews_pairs", "test_size": args.test, "validation_size": 50,
                     "max_rows": args.pairs, "max_length": 128},
            "adapt": {"method": "lora", "freeze_layers": args.freeze_layers, "lora": LORA},
            "train": {"objective": args.objective, "epochs": 1, "learning_rate": args.lr, "batch_size": 8,
                      "warmup": 0.1, "log_every": 5, "seed": 42, "dpo": {"beta": args.beta},
                      "orpo": {"lambda": 0.1}, **({"threads": run_threads} if run_threads else {})},
            "eval": {"before": True, "batch_size": 32, "generate": {"max_new_tokens": 4}}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-rows", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--objective", default="dpo", choices=["dpo", "orpo"])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="smollm2", help="a causal LM folder instead (a quick check of the script)")
    ap.add_argument("--freeze-layers", type=int, default=15, help="LoRA in the blocks above these (SmolLM2: 30)")
    args = ap.parse_args()
    print(machine(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="dpo-demo-"))
    t0 = time.perf_counter()

    sft = ts.load_recipe(RECIPES / "reviews_chat.yaml",
                         [f"data.max_rows={args.sft_rows}", "data.test_size=50", "data.validation_size=20",
                          "eval.before=false", f"model.name={args.model}",
                          f"adapt.freeze_layers={args.freeze_layers}"]
                         + ([f"train.threads={args.threads}"] if args.threads else []))
    sft_run = ts.train(sft, run_dir=work / "sft")
    t_sft = time.perf_counter() - t0

    # the base model on the preference stage's held-out pairs (eval.before of a run from the base would train it)
    base_recipe = ts.load_recipe(pair_recipe(args.model, args, args.threads))
    task = get_task(base_recipe)
    test = load_splits(task, base_recipe)[0]["test"].rows
    model = task.load_model().eval()
    with torch.no_grad():
        base = task.evaluate_final(model, test, task.encode(test), 32)
    del model

    t1 = time.perf_counter()
    pref_run = ts.train(ts.load_recipe(pair_recipe(str(sft_run.model_dir), args, args.threads)),
                        run_dir=work / args.objective)
    t_pref = time.perf_counter() - t1
    after, sft_scores = pref_run.metrics, pref_run.metrics["before"]
    result = {"objective": args.objective, "sft_rows": args.sft_rows, "pairs": args.pairs, "test_pairs": args.test,
              "lr": args.lr, "beta": args.beta, "machine": machine(),
              "base": {k: base.get(k) for k in KEYS}, "sft": {k: sft_scores.get(k) for k in KEYS},
              args.objective: {k: after.get(k) for k in KEYS},
              "seconds": {"sft_run": round(t_sft, 1), "preference_run": round(t_pref, 1),
                          "total": round(time.perf_counter() - t0, 1)},
              "runs": {"sft": str(sft_run.path), args.objective: str(pref_run.path)}}
    print(json.dumps(result, indent=2))
    print("\n| stage | exact match | logp_accuracy | reward accuracy | reward margin |\n|---|---|---|---|---|")
    for stage in ("base", "sft", args.objective):
        r = result[stage]
        print(f"| {stage} | {r['exact_match']:.3f} | {r['logp_accuracy']:.3f} | {r['reward_accuracy']:.3f} | "
              f"{r['reward_margin']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
