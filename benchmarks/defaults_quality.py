"""Issue 19's evidence: a README-shaped recipe, the defaults (`epochs: auto`), `tune`, and HF Trainer with its
defaults, all scored by K-fold cross-validation over the same folds.

    .venv/bin/python benchmarks/defaults_quality.py [--folds 3] [--only NAME] [--arms readme,defaults,hf]
                                                   [--budget 10m] [--keep DIR]

Data: the builders of benchmarks/small_data_quality.py (rotten-600 and political-189: MiniLM text; fashion-700:
MobileNetV2 at 64 px), and chat-360: 360 bundled reviews_chat conversations (SmolLM2 + LoRA; exact match of the
one-word answer `fresh` / `rotten` on held-out prompts, greedy, 8 new tokens).
Arms, per data set, on the same folds (the pooled rows cut by StratifiedKFold, seed 42; KFold for chat):
  readme    the README-shaped recipe with a fixed small epoch count: text 3 epochs, lr 5e-5, batch 16; images the
            shipped fashion_mnist.yaml's own train/adapt/augment settings (2 epochs, lr 1e-3, batch 64, fp32);
            chat the README's chat example (LoRA, packing, pack_length 256) with 1 epoch (its learning rate and
            batch size unset, as the README leaves them: the defaults')
  defaults  a recipe naming only task, model and data (data keys kept; train, adapt, augment, eval dropped but
            chat's eval.generate, which defines its metric):
            epochs auto, learning rate and batch size chosen at training start (tunesmith/defaults.py)
  tune      nested: on each fold `tune --budget B` from the defaults recipe sees only the fold's train rows; the
            model it ends with is scored on the held-out fold (only with --budget: folds x B of wall time); with
            the defaults arm also run, a line per metric compares tune with it fold by fold (issue 19: (c) >= (b))
  hf        HF Trainer with TrainingArguments' defaults (lr 5e-5, 3 epochs, batch 8, linear decay, no warmup, no
            early stopping, fp32; none for chat) on the same model tunesmith builds and the same encoded features (same
            tokenizer, max_length, image processor and collate); it trains on all of the fold's train side (it
            holds nothing out, as nothing is chosen), and is scored on the same held-out fold
Prints CPU flags, load average, mean and 95% interval per arm and metric, the corrected paired t-test over folds
against `readme` (tunesmith.selection.cv.paired), wall seconds per arm, and per fold what the tunesmith arms ran
(learning rate, batch size, steps, epochs, best step, why training stopped).
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from small_data_quality import DATA, METRICS, nested_tune  # noqa: E402

README_TRAIN = {"epochs": 3, "learning_rate": 5e-5, "batch_size": 16}     # the README's text recipe, as filed
ARMS = ("readme", "defaults", "tune", "hf")
CHAT_METRICS = ("exact_match", "rouge_l")


def chat_360(folder: Path) -> dict:
    """360 bundled reviews_chat conversations (a review in, `fresh` / `rotten` out): 3 folds of 240 to train on,
    as the issue's chat task. The README's chat example: LoRA, packing, eval.generate (8 new tokens); 1 epoch."""
    import random

    from tunesmith import io
    from tunesmith.assets.bundled import reviews_chat

    rows = random.Random(0).sample(io.read_jsonl(reviews_chat()), 360)
    path = folder / "chat360.jsonl"
    io.write_jsonl(path, rows)
    return {"task": "causal-lm", "name": "chat-360", "model": "smollm2",
            "data": {"train": str(path), "max_length": 128},
            "adapt": {"method": "lora"}, "train": {"epochs": 1, "packing": True, "pack_length": 256},
            "eval": {"generate": {"max_new_tokens": 8}}}


DATA = {**DATA, "chat-360": chat_360}


def readme_recipe(recipe: dict) -> dict:
    """The recipe as the README shapes it: a shipped recipe keeps its own train settings (images); a bare one
    (text) gets the README's 3 epochs, lr 5e-5, batch 16."""
    return recipe if "train" in recipe else {**recipe, "train": dict(README_TRAIN)}


def defaults_recipe(recipe: dict) -> dict:
    """Only task, name, model and data: every training choice is left to the defaults."""
    out = {k: recipe[k] for k in ("task", "name", "model", "data") if k in recipe}
    if "generate" in recipe.get("eval", {}):                   # what the metric is (exact match), not training
        out["eval"] = {"generate": recipe["eval"]["generate"]}
    return out


def metrics_of(name: str) -> tuple[str, ...]:
    return CHAT_METRICS if name.startswith("chat") else METRICS


def run_hf(cv: dict, cv_dir: Path, out: Path) -> dict:
    """HF Trainer (defaults) on each fold's train side, scored on its held-out fold; cv.json's shape for paired()."""
    import numpy as np
    import yaml
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import Trainer, TrainingArguments

    from tunesmith.selection.cv import fold_recipe, interval
    from tunesmith.splits import load_rows
    from tunesmith.tasks import get_task

    base = yaml.safe_load((cv_dir / "recipe.yaml").read_text())
    values = {m: [] for m in METRICS}
    for name in cv["runs"]:
        recipe = fold_recipe(base, cv_dir / "folds" / name)
        task = get_task(recipe)
        task.setup()
        train_rows = load_rows(task, recipe.data.train)
        test_rows = load_rows(task, recipe.data.test)
        task.prepare(train_rows)                                  # the label set, as training reads it
        model = task.load_model()
        args = TrainingArguments(output_dir=str(out / name), save_strategy="no", report_to="none",
                                 disable_tqdm=True, logging_steps=50,   # everything else: HF's defaults, but
                                 remove_unused_columns=False)           # keep `pixels`: task.collate reads it
        trainer = Trainer(model=model, args=args, train_dataset=list(task.encode(train_rows)),
                          data_collator=task.collate)
        trainer.train()
        pred = trainer.predict(list(task.encode(test_rows)))
        y, p = pred.label_ids, np.asarray(pred.predictions).argmax(-1)
        values["accuracy"].append(float(accuracy_score(y, p)))
        values["f1_macro"].append(float(f1_score(y, p, average="macro")))
        print(f"  [hf {name}] {len(train_rows)} train rows, {args.num_train_epochs:g} epochs, batch "
              f"{args.per_device_train_batch_size}, lr {args.learning_rate:g}: accuracy {values['accuracy'][-1]:.3f}",
              flush=True)
    return {"assignment": cv["assignment"], "test_fraction": cv["test_fraction"], "runs": cv["runs"],
            "metrics": {m: interval(v) for m, v in values.items()}}


def what_ran(cv: dict) -> list[str]:
    """Per fold: the learning rate and batch size that ran, steps, epochs, best step and why training stopped."""
    import tunesmith as ts

    out = []
    for name in cv["runs"]:
        run = ts.Run(Path(cv["folder"]) / name)
        t, tr = run.training, run.recipe.train
        out.append(f"{name}: lr {tr.learning_rate:g}, batch {tr.batch_size}, {t.get('steps')} steps, "
                   f"{t.get('epochs', 0):.1f} epochs, best step {t.get('best_step')}; {t.get('ended', '-')}")
    return out


def tune_vs_defaults(n: str, res: dict) -> list[str]:
    """Issue 19's goal (c) >= (b): the tune arm against the defaults arm on the folds tune ran (--tune-folds: the
    first N), fold by fold; the corrected paired t-test where 2 or more folds pair (a failed fold pairs none)."""
    from tunesmith.selection.cv import paired

    tuned, plain = res["tune"], res["defaults"]
    out = []
    for m in metrics_of(n):
        pairs = [(f["test"][m], d) for f, d in zip(tuned["folds"], plain["metrics"][m]["values"])
                 if "test" in f and f["test"][m] == f["test"][m]]          # NaN: no model on that fold
        if not pairs:
            out.append(f"tune vs defaults, {m}: no fold pairs")
            continue
        diff = sum(a - b for a, b in pairs) / len(pairs)
        t = paired({**plain, "metrics": {m: {"values": [a for a, _ in pairs]}}},
                   {**plain, "metrics": {m: {"values": [b for _, b in pairs]}}})[m] if len(pairs) > 1 else None
        out.append(f"tune vs defaults, {m}: {diff:+.3f} over {len(pairs)} fold(s)"
                   + (f", p={t['p']:.2f}" if t else "") + " (tune / defaults: "
                   + ", ".join(f"{a:.3f} / {b:.3f}" for a, b in pairs) + ")")
    return out


def main():
    import tunesmith as ts
    from tunesmith import io
    from tunesmith.device import cpu_flags
    from tunesmith.selection.cv import cross_validate, paired

    p = argparse.ArgumentParser()
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--only", choices=list(DATA), action="append")
    p.add_argument("--arms", default="readme,defaults,hf", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--budget", default=None, help="tune's budget per fold (adds the tune arm), e.g. 10m")
    p.add_argument("--tune-folds", type=int, default=None, help="tune on the first N folds only (a check)")
    p.add_argument("--keep", default=None, help="keep run folders here (default: a temporary folder, deleted)")
    args = p.parse_args()
    arms = [a for a in args.arms.split(",") if a] + (["tune"] if args.budget and "tune" not in args.arms else [])
    if bad := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"unknown arm(s) {bad}: choose from {', '.join(ARMS)}")
    if "tune" in arms and not args.budget:
        raise SystemExit("the tune arm needs --budget")
    if "readme" not in arms:
        raise SystemExit("readme is the arm every other is compared with: keep it in --arms")
    if args.keep:
        out = Path(args.keep)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = Path(tempfile.mkdtemp(prefix="defaults-quality-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)   # run folders: GBs per run
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"cpu flags: {flags}; {os.cpu_count()} cpus; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f"; {args.folds}-fold cv; arms {', '.join(arms)}; folder {out}", flush=True)
    names = args.only or list(DATA)
    results: dict = {n: {} for n in names}
    ran: dict = {n: {} for n in names}
    loads: list[float] = []

    for n in names:                                               # one data set at a time
        recipe = DATA[n](out)
        for arm in arms:
            t0 = time.monotonic()
            print(f"\n== {n} {arm} (load average {os.getloadavg()[0]:.2f})", flush=True)
            loads.append(os.getloadavg()[0])
            if arm in ("readme", "defaults"):
                r = ts.load_recipe(readme_recipe(recipe) if arm == "readme" else defaults_recipe(recipe))
                res = cross_validate(r, out / f"{n}-{arm}", folds=args.folds, predictions=False)
                ran[n][arm] = what_ran(res)
            elif arm == "hf" and n.startswith("chat"):
                print("  no HF arm for chat: HF Trainer has no generation metric (exact match) of its own; skipped")
                continue
            elif arm == "hf":
                res = run_hf(results[n]["readme"], out / f"{n}-readme", out / f"{n}-hf")
            else:
                r = ts.load_recipe(defaults_recipe(recipe))
                res = nested_tune(r, results[n]["readme"], out / f"{n}-readme", out / f"{n}-tune", args.budget,
                                  metrics_of(n), args.tune_folds)
            res["seconds"] = time.monotonic() - t0
            results[n][arm] = res
            io.write_json(out / "results.json", {"results": results, "ran": ran, "loads": loads})

    loads.append(os.getloadavg()[0])
    print(f"\nload average at each arm's start and at the end: {' '.join(f'{x:.2f}' for x in loads)}")
    print(f"{'data':<15}{'metric':<10}" + "".join(f" | {a:<36}" for a in arms))
    for n in names:
        base = results[n]["readme"]
        shown = [a for a in arms if a in results[n]]
        for m in metrics_of(n):
            cells = []
            for arm in shown:
                res = results[n][arm]
                s = res["metrics"][m]
                cell = f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"
                if arm != "readme" and not res.get("missing") and len(res["runs"]) == len(base["runs"]):
                    t = paired(res, base)[m]
                    cell += f" {t['difference']:+.3f} p={t['p']:.2f}"
                cells.append(f" | {cell:<36}")
            print(f"{n:<15}{m:<10}" + "".join(cells))
            print(f"{'':<15}{'  folds':<10}" + "".join(
                f" | {' / '.join(f'{v:.3f}' for v in results[n][a]['metrics'][m]['values']):<36}" for a in shown))
        print(f"{'':<15}{'seconds':<10}" + "".join(f" | {results[n][a]['seconds']:<36.0f}" for a in shown))
        for arm, lines in ran[n].items():
            for line in lines:
                print(f"{'':<15}{arm}: {line}")
        if "tune" in results[n] and "defaults" in results[n]:
            for line in tune_vs_defaults(n, results[n]):
                print(f"{'':<15}{line}")
        if "tune" in results[n]:
            for f in results[n]["tune"]["folds"]:
                print(f"{'':<15}tune {f['fold']}: {f['seconds']:.0f}s wall, {f['used']:.0%} of "
                      f"{f['budget_seconds']:.0f}s budget used; load average (1/5/15 min) "
                      f"{' '.join(f'{x:.2f}' for x in f['load_start'])} -> "
                      f"{' '.join(f'{x:.2f}' for x in f['load_end'])}; picked {f['pick']}")
    print(f"run folders: {out}" + ("" if args.keep else " (deleted on exit: GBs per run)"))


if __name__ == "__main__":
    main()
