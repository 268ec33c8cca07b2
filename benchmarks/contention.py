"""Training throughput when another process keeps a core busy: tunesmith's thread choice vs all cores.

    .venv/bin/python benchmarks/contention.py [--steps 40] [--rows 640]

The bundled MiniLM on bundled Rotten Tomatoes (fp32, batch 32, max_length 64), three runs in this process:
alone (threads chosen: all free cores); beside a busy process (a Python spin loop, one core) with the threads
chosen (train.threads unset); beside the same busy process with every core forced (train.threads = cores: the old
behaviour). Prints samples/s of each, the ratios to the run alone, the CPU flags and the load average. Goal: beside
a busy process throughput falls no more than in proportion to the cores taken (>= (cores - 1) / cores of alone).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(recipe: dict, folder: str, threads: int | None) -> float:
    import tunesmith as ts

    r = ts.load_recipe(recipe, [f"train.threads={threads if threads else 'null'}"])
    summary = next(x for x in ts.train(r, run_dir=folder).history if x.get("summary"))
    return summary["samples"] / (summary["train_seconds"] - summary["eval_seconds"] - summary["checkpoint_seconds"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rows", type=int, default=640)
    args = p.parse_args()
    from tunesmith.device import cpu_flags

    cores = len(os.sched_getaffinity(0))
    simd = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"{cores} cores; cpu flags {' '.join(simd)}; load average {os.getloadavg()[0]:.2f}")
    recipe = {"task": "text-classification", "model": "minilm",
              "data": {"train": "rotten_tomatoes", "max_rows": args.rows, "max_eval_rows": 64, "max_length": 64},
              "train": {"max_steps": args.steps, "batch_size": 32, "precision": "fp32", "eval_every": 10_000,
                        "log_every": 10, "seed": 0}}
    tmp = tempfile.mkdtemp(prefix="contention-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)   # run folders: GBs per run
    alone = run(recipe, f"{tmp}/alone", None)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        chosen = run(recipe, f"{tmp}/chosen", None)
        forced = run(recipe, f"{tmp}/forced", cores)
    finally:
        spin.kill()
        spin.wait()
    print(f"\n{'run':<44}{'samples/s':>10}{'vs alone':>10}")
    for name, value in (("alone (threads chosen)", alone), ("beside a busy process, threads chosen", chosen),
                        (f"beside a busy process, threads forced to {cores}", forced)):
        print(f"{name:<44}{value:>10.1f}{value / alone:>9.2f}x")
    print(f"goal: beside a busy process >= {(cores - 1) / cores:.2f}x of alone; "
          f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
