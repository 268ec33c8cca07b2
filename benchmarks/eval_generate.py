"""Generation in evaluation: one example at a time vs tunesmith's batches (left padding, KV cache, stop at EOS).

    .venv/bin/python benchmarks/eval_generate.py [--n 64] [--batch 32] [--max-new-tokens 16] [--precision fp32]

The bundled SmolLM2-135M-Instruct (base weights) answers N held-out reviews_chat prompts greedily, through the
causal-lm task's own `generate` (what eval.json's exact match and `tunesmith predict` use), once with batch 1 and
once with --batch, in the recipe's precision (`auto`). Prints examples/s of each, the ratio, and how many answers
are identical (greedy decoding; padding can move the last bits of a logit, rarely the argmax).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPE = Path(__file__).resolve().parent.parent / "tunesmith" / "recipes" / "reviews_chat.yaml"


def main():
    import torch

    from tunesmith.device import cpu_flags
    from tunesmith.recipe import load
    from tunesmith.splits import load_splits
    from tunesmith.tasks import get_task
    from tunesmith.tasks.schema import GenerateConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--precision", default="auto", help="train.precision, which inference follows")
    args = ap.parse_args()
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads; "
          f"precision {args.precision}")
    recipe = load(RECIPE, [f"train.precision={args.precision}"])
    task = get_task(recipe)
    task.setup()
    tables, _ = load_splits(task, recipe)
    rows = tables["test"].rows[:args.n]
    prompts = [task.split_answer(task.messages(r))[0] for r in rows]
    model = task.load_model().eval()
    settings = GenerateConfig(max_new_tokens=args.max_new_tokens)
    out = {}
    for batch in (1, args.batch):
        t0 = time.perf_counter()
        out[batch] = task.generate(model, prompts, batch, settings)
        seconds = time.perf_counter() - t0
        print(f"batch {batch:>3}: {len(prompts)} answers in {seconds:.1f}s = {len(prompts) / seconds:.2f} examples/s")
        out[f"s{batch}"] = seconds
    same = sum(a == b for a, b in zip(out[1], out[args.batch]))
    print(f"ratio {out['s1'] / out[f's{args.batch}']:.1f}x; identical answers {same} of {len(prompts)}; "
          f"first answer: {out[args.batch][0]!r}")


if __name__ == "__main__":
    main()
