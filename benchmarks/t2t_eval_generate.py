"""text2text generation in evaluation: one example at a time vs tunesmith's batches, for both model families.

    .venv/bin/python benchmarks/t2t_eval_generate.py [--n 32] [--batch 16] [--max-new-tokens 16] [--family t5 smollm2]

Models, random init (no T5 weights ship in a registry package; random weights make every example run to
--max-new-tokens, the most work a batch can hold): "t5" a T5 of t5-small's shape (benchmarks/t2t_vs_hf.py's, the real
T5 tokenizer); "smollm2" a Llama with the bundled SmolLM2-135M's config and tokenizer (decoder-only, its chat
template). Data: bundled Rotten Tomatoes snippets -> their first 8 words, the prompts of the text2text task
("summarize: " + snippet, cut at 64 tokens). Generation is the task's own (`completions`: what eval.json's scores and
`predict` use; batches of similar length, left padding for decoder-only, KV cache), greedy, fp32, once with batch 1
and once with --batch. Prints examples/s of each, the ratio, and how many outputs are identical.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from t2t_vs_hf import build_model, write_pairs  # noqa: E402

from tunesmith.recipe import load  # noqa: E402
from tunesmith.splits import load_splits  # noqa: E402
from tunesmith.tasks import get_task  # noqa: E402
from tunesmith.tasks.schema import GenerateConfig  # noqa: E402


def build_smollm2(folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunesmith.assets.bundled import smollm2

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2())).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2()).save_pretrained(folder)
    return folder


def main():
    from tunesmith.device import cpu_flags

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--family", nargs="+", default=["t5", "smollm2"], choices=["t5", "smollm2"])
    args = ap.parse_args()
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; load average {os.getloadavg()[0]:.2f}; {torch.get_num_threads()} threads; fp32; "
          f"greedy, {args.max_new_tokens} new tokens")
    tmp = Path(tempfile.mkdtemp(prefix="bench-t2t-gen-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    data = write_pairs(tmp / "pairs.jsonl", 400)
    for family in args.family:
        folder = (build_model if family == "t5" else build_smollm2)(tmp / family)
        recipe = load({"task": "text2text", "model": str(folder),
                       "data": {"train": str(data), "validation_size": 50, "test_size": max(args.n, 50),
                                "prefix": "summarize: ", "max_length": 64, "max_target_length": 16},
                       "adapt": {"method": "full"}, "train": {"precision": "fp32"}})
        task = get_task(recipe)
        tables, _ = load_splits(task, recipe)
        prompts = [f["prompt_ids"] for f in task.encode(tables["test"].rows[:args.n])]
        model = task.load_model().eval()
        settings = GenerateConfig(max_new_tokens=args.max_new_tokens)
        out, seconds = {}, {}
        for batch in (1, args.batch):
            t0 = time.perf_counter()
            out[batch] = [c.text for c in task.completions(model, prompts, batch, settings)]
            seconds[batch] = time.perf_counter() - t0
            print(f"{family:>8} batch {batch:>3}: {len(prompts)} outputs in {seconds[batch]:.1f}s = "
                  f"{len(prompts) / seconds[batch]:.2f} examples/s")
        same = sum(a == b for a, b in zip(out[1], out[args.batch]))
        print(f"{family:>8} ratio {seconds[1] / seconds[args.batch]:.1f}x; identical outputs {same} of {len(prompts)};"
              f" {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; load average "
              f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
