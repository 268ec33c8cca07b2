"""Offline text2text demo on the bundled SmolLM2-135M-Instruct (decoder-only, its own chat template), LoRA.

    .venv/bin/python benchmarks/t2t_demo.py [--rows N] [--test N] [--steps S]

The pairs are built from the bundled Rotten Tomatoes snippets: source = the snippet, target = "this review is fresh"
or "this review is rotten" (the critic's verdict as a phrase of four words: sacrebleu's corpus BLEU, up to 4-grams, is
0 when every output is shorter than four tokens, whatever they are). What it shows, honestly: the text2text path on a
real pretrained chat model (prompt masked, LoRA, generation in evaluation, BLEU/chrF/ROUGE/exact match before and after
on held-out pairs) learning a house answer format plus the sentiment behind it. It is not a summarisation or translation
benchmark: no registry package ships such pairs, and no T5/BART weights ship at all (see shared/ASSETS.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tunesmith as ts  # noqa: E402
from tunesmith.assets.bundled import rotten_tomatoes  # noqa: E402

KEYS = ("exact_match", "bleu", "chrf", "rougeL", "length_ratio", "outputs_at_max_new_tokens", "loss")


def write_pairs(path: Path, rows: int) -> Path:
    with open(rotten_tomatoes(), newline="") as f, open(path, "w") as out:
        for i, row in enumerate(csv.DictReader(f)):
            if i >= rows:
                break
            out.write(json.dumps({"source": row["text"], "target": f"this review is {row['label']}"}) + "\n")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=700, help="pairs read (default 700)")
    ap.add_argument("--test", type=int, default=100, help="held-out test pairs (default 100)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="t2t-demo-"))
    recipe = {"task": "text2text", "name": "t2t-demo", "model": "smollm2",
              "data": {"train": str(write_pairs(tmp / "pairs.jsonl", args.rows)), "test_size": args.test,
                       "validation_size": 50, "template": "Review: {source}\nVerdict:",
                       "max_length": 96, "max_target_length": 6},
              "adapt": {"method": "lora", "freeze_layers": 15,
                        "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]}},
              "train": {"max_steps": args.steps, "batch_size": 8, "learning_rate": 2e-3, "warmup": 0.1,
                        "eval_every": args.steps, "log_every": 10, "seed": 42},
              "eval": {"before": True, "batch_size": 32, "generate": {"max_new_tokens": 6}}}
    print(f"load average {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    run = ts.train(ts.load_recipe(recipe), run_dir=tmp / "run")
    m = run.metrics
    print(f"\n{'metric':<28}{'before':>10}{'after':>10}")
    for k in KEYS:
        print(f"{k:<28}{m['before'][k]:>10.3f}{m[k]:>10.3f}")
    samples = [json.loads(x) for x in (run.path / "samples.jsonl").read_text().splitlines()][:5]
    for s in samples:
        print(f"- {s['prompt'][:70]!r} -> {s['output']!r} (reference {s['reference']!r})")
    print(f"\n{args.test} held-out pairs; {time.perf_counter() - t0:.0f}s; load average {os.getloadavg()[0]:.2f}; "
          f"run folder {run.path}")


if __name__ == "__main__":
    main()
