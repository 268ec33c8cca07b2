"""`tunesmith tune RECIPE --budget 15m`: automated fine-tuning within a wall-time budget.

1. profile the data (rows, classes, balance, tokens) and measure a step (a 5-step probe run);
2. plan: the plain recipe, then candidates (head only on cached features, top blocks, full at two learning
   rates, LoRA) raced by successive halving: every candidate trains r epochs, the best third 3r, and so on;
   the plan (runs x epochs, estimated seconds) is printed before anything else trains;
3. every run carries a Deadline callback: past the budget it raises StopTraining, so the run ends after the
   current step with one evaluation (the final test evaluation of its best checkpoint); no run starts
   unless its estimate fits in what is left.
It ends with the table of runs against the plain recipe, tune.json and best.yaml in the tune folder.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path

from tunesmith.recipe import Recipe
from tunesmith.run import Callback, StopTraining
from tunesmith.search import best_validation, with_values
from tunesmith.searchspace import seconds


class Deadline(Callback):
    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_log(self, record: dict) -> None:
        if not record.get("summary") and time.monotonic() >= self.deadline:
            raise StopTraining("time budget spent")


def profile(recipe: Recipe) -> dict:
    """What the plan is drawn from: train rows, classes and their balance, tokens per example, model blocks."""
    from transformers import AutoConfig

    from tunesmith.assets import resolve_model
    from tunesmith.splits import load_data
    from tunesmith.tasks import get_task

    task = get_task(recipe)
    task.setup()
    tables = load_data(task, recipe).tables
    rows = tables["train"].rows
    keys = [task.stratify_key(r) for r in rows]
    counts = {k: keys.count(k) for k in set(keys)} if keys and keys[0] is not None else {}
    sample = task.encode(rows[:200])
    config = AutoConfig.from_pretrained(resolve_model(recipe.model.name), revision=recipe.model.revision)
    return {"rows": len(rows), "classes": len(counts) or None,
            "balance": round(max(counts.values()) / min(counts.values()), 2) if counts else None,
            "tokens": statistics.median(task.length(f) for f in sample) if sample else None,
            "blocks": getattr(config, "num_hidden_layers", None)}


def candidates(recipe: Recipe, prof: dict) -> list[tuple[str, dict]]:
    """(name, recipe keys) to race; head-only first (cheapest, on cached features)."""
    blocks = prof["blocks"] or 6
    out = [("head-only", {"adapt.method": "freeze", "adapt.freeze_backbone": True, "model.dropout": 0.0,
                          "train.learning_rate": 2e-3, "train.scheduler": "constant"}),
           (f"top-2 of {blocks}", {"adapt.method": "full", "adapt.freeze_backbone": False,
                                   "adapt.freeze_embeddings": True,
                                   "adapt.freeze_layers": max(blocks - 2, 0), "model.dropout": 0.0,
                                   "train.learning_rate": 2e-4}),
           ("full lr 5e-5", {"adapt.method": "full", "train.learning_rate": 5e-5}),
           ("full lr 1.5e-4", {"adapt.method": "full", "train.learning_rate": 1.5e-4}),
           ("lora r16", {"adapt.method": "lora", "adapt.lora.r": 16, "adapt.lora.alpha": 32,
                         "train.learning_rate": 1e-3})]
    for name, values in out[2:]:                    # not frozen: whatever the plain recipe froze is released
        values.update({"adapt.freeze_backbone": False, "adapt.freeze_layers": 0, "adapt.freeze_embeddings": False})
    if recipe.adapt.method == "lora":               # a task whose default is LoRA: keep its method family
        out = [c for c in out if c[1]["adapt.method"] != "full"]
    return out


def tune(recipe: Recipe, folder: str | Path, budget: str, say=print) -> dict:
    import tunesmith as ts

    start = time.monotonic()
    deadline = start + seconds(budget)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prof = profile(recipe)
    say(f"data: {prof['rows']} train rows, {prof['classes'] or '-'} classes (largest/smallest {prof['balance']}), "
        f"median {prof['tokens']} tokens; model: {prof['blocks']} blocks")
    stop = Deadline(deadline)
    t0 = time.monotonic()                           # probe: load + 5 steps + one evaluation + final test
    probe = ts.train(with_values(recipe, {"train.max_steps": 5, "train.log_every": 1}), folder / "probe",
                     callbacks=[stop])
    overhead = time.monotonic() - t0
    steps = [r for r in probe.history if "samples_per_s" in r]
    # one step per record; the first carries one-time costs (allocation, kernel choice): the median of the rest
    step_s = statistics.median(recipe.train.batch_size * recipe.train.grad_accum / r["samples_per_s"]
                               for r in steps[1:] or steps)
    overhead = max(overhead - step_s * len(steps), 0.0)
    per_epoch = math.ceil(prof["rows"] / recipe.train.batch_size)      # train rows, validation already cut

    def estimate(epochs: float) -> float:
        return overhead + epochs * per_epoch * step_s

    cands = candidates(recipe, prof)
    rungs, r = [], 1
    n = len(cands)
    while n >= 1 and r <= max(recipe.train.epochs * 3, 1):
        rungs.append((n, r))
        if n == 1:
            break
        n, r = math.ceil(n / 3), r * 3
    total = estimate(recipe.train.epochs) + sum(k * estimate(e) for k, e in rungs)
    say(f"plan: plain recipe ({recipe.train.epochs:g} epochs), then {' -> '.join(f'{k} x {e} epochs' for k, e in rungs)}"
        f" ({', '.join(c[0] for c in cands)}); step {step_s:.3f}s, {per_epoch} steps/epoch, run overhead "
        f"{overhead:.1f}s; estimated {total:.0f}s of {seconds(budget):.0f}s budget")

    results = []

    def attempt(name: str, values: dict, epochs: float) -> dict | None:
        if time.monotonic() + estimate(min(epochs, 1)) > deadline:
            say(f"tune: skipping {name} ({epochs:g} epochs): does not fit in the budget left")
            return None
        run_dir = folder / f"{len(results):02d}-{name.replace(' ', '-').replace('/', '-')}-{epochs:g}ep"
        run = ts.train(with_values(recipe, {**values, "train.epochs": epochs, "train.log_every": 1}), run_dir,
                       callbacks=[stop])
        row = {"name": name, "epochs": epochs, "run_dir": str(run_dir), "values": values,
               "score": best_validation(run.history, recipe.train.metric, recipe.direction),
               "test": run.metrics.get(recipe.train.metric),
               "stopped": run.history[-1].get("stopped") if run.history else None}
        results.append(row)
        return row

    plain = attempt("plain", {}, recipe.train.epochs)
    alive = cands
    for k, epochs in rungs:
        scored = []
        for name, values in alive[:k]:
            row = attempt(name, values, epochs)
            if row and row["score"] is not None:
                scored.append(((row["score"] if recipe.direction == "max" else -row["score"]), name, values))
        if not scored:
            break
        scored.sort(key=lambda x: -x[0])
        alive = [(n, v) for _, n, v in scored]
    return finish(recipe, folder, results, plain, prof, time.monotonic() - start, say)


def finish(recipe, folder: Path, results: list[dict], plain: dict | None, prof: dict, elapsed: float, say) -> dict:
    sign = 1 if recipe.direction == "max" else -1
    done = [r for r in results if r["score"] is not None]
    best = max(done, key=lambda r: sign * r["score"]) if done else None
    out = {"metric": recipe.train.metric, "profile": prof, "seconds": elapsed, "runs": results, "best": best,
           "plain": plain}
    (folder / "tune.json").write_text(json.dumps(out, indent=2) + "\n")
    if best:
        shutil.copyfile(Path(best["run_dir"]) / "recipe.yaml", folder / "best.yaml")
    m = recipe.train.metric
    say(f"\n{'run':<22}{'epochs':>7}{m + ' val':>16}{m + ' test':>16}  note")
    for r in results:
        fmt = lambda v: f"{v:>16.4f}" if v is not None else f"{'-':>16}"  # noqa: E731
        note = ("best " if r is best else "") + (f"({r['stopped']})" if r["stopped"] else "")
        say(f"{r['name']:<22}{r['epochs']:>7g}{fmt(r['score'])}{fmt(r['test'])}  {note}")
    if best and plain and plain["test"] is not None and best["test"] is not None:
        say(f"best vs plain recipe: {m} {best['test']:.4f} vs {plain['test']:.4f} on the test split "
            f"({best['test'] - plain['test']:+.4f}); best run {best['run_dir']}; recipe {folder / 'best.yaml'}")
    say(f"tune: {elapsed:.0f}s spent")
    return out
