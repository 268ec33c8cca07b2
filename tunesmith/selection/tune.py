"""`ts.tune(recipe, budget="15m")` and `tunesmith tune RECIPE --budget 15m`: automated fine-tuning within a
wall-time budget, in a tune folder (default runs/tune-<recipe name or task>).

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

import math
import shutil
import statistics
import time
from pathlib import Path

from tunesmith import defaults, io
from tunesmith.errors import TunesmithError
from tunesmith.recipe import Recipe, RecipeError, load
from tunesmith.run import Callback, StopTraining
from tunesmith.selection.search import best_validation, with_values
from tunesmith.selection.space import seconds

MIN_BUDGET_S = 5.0                                  # a probe run of a tiny model on CPU takes about that


class Deadline(Callback):
    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_log(self, record: dict) -> None:
        if not record.get("summary") and time.monotonic() >= self.deadline:
            raise StopTraining("time budget spent")


def profile(recipe: Recipe) -> dict:
    """What the plan is drawn from: train rows, classes and their balance, tokens per example, model blocks."""
    from transformers import AutoConfig

    from tunesmith.assets.bundled import resolve_model
    from tunesmith.splits import load_data
    from tunesmith.tasks import get_task

    task = get_task(recipe)
    task.setup()
    tables = load_data(task, recipe).tables
    rows = tables["train"].rows
    keys = [task.stratify_key(r) for r in rows]
    counts = {k: keys.count(k) for k in set(keys)} if keys and keys[0] is not None else {}
    sample = task.encode(rows[:200])
    config = AutoConfig.from_pretrained(resolve_model(recipe.model.name), revision=recipe.model.revision,
                                        trust_remote_code=recipe.model.trust_remote_code)
    return {"rows": len(rows), "classes": len(counts) or None,
            "balance": round(max(counts.values()) / min(counts.values()), 2) if counts else None,
            "tokens": statistics.median(task.length(f) for f in sample) if sample else None,
            "blocks": count_blocks(config, recipe.model.trust_remote_code)}


def count_blocks(config, trust_remote_code: bool) -> int | None:
    """Blocks as adapt.freeze_layers counts them (transformer layers, CNN stages), on a weightless skeleton."""
    import torch
    from transformers import AutoModel

    from tunesmith.adapt import find_blocks

    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:                               # an architecture AutoModel does not know: the config's count
        return getattr(config, "num_hidden_layers", None)
    name = find_blocks(skeleton)
    return len(skeleton.get_submodule(name)) if name else None


def candidates(recipe: Recipe, prof: dict) -> list[tuple[str, dict]]:
    """(name, recipe keys) to race; head-only first (cheapest, on cached features)."""
    blocks = prof["blocks"] or 6
    lr = recipe.train.learning_rate                 # full fine-tuning at the recipe's rate (set for its model) and 3x
    out = [("head-only", {"adapt.method": "freeze", "adapt.freeze_backbone": True, "model.dropout": 0.0,
                          "train.learning_rate": 2e-3, "train.scheduler": "constant"}),
           (f"top-2 of {blocks}", {"adapt.method": "full", "adapt.freeze_backbone": False,
                                   "adapt.freeze_embeddings": True,
                                   "adapt.freeze_layers": max(blocks - 2, 0), "model.dropout": 0.0,
                                   "train.learning_rate": 4 * lr}),
           (f"full lr {lr:g}", {"adapt.method": "full", "train.learning_rate": lr}),
           (f"full lr {3 * lr:g}", {"adapt.method": "full", "train.learning_rate": 3 * lr}),
           ("lora r16", {"adapt.method": "lora", "adapt.lora.r": 16, "adapt.lora.alpha": 32,
                         "train.learning_rate": 1e-3})]
    for _, values in out[2:]:                    # not frozen: whatever the plain recipe froze is released
        values.update({"adapt.freeze_backbone": False, "adapt.freeze_layers": 0, "adapt.freeze_embeddings": False})
    for _, values in out:                           # rungs are counted in epochs exactly (see tune())
        values["train.min_steps"] = 0
    if recipe.adapt.method == "lora":               # a task whose default is LoRA: keep its method family
        out = [c for c in out if c[1]["adapt.method"] != "full"]
    return out


def tune(recipe, folder: str | Path | None = None, budget: str | None = None, say=print) -> dict:
    """Plan, race and compare within `budget` (wall time, e.g. "15m"; default the recipe's search.budget).
    recipe: a Recipe, or what ts.load_recipe takes (a YAML path, a dict); folder: default runs/tune-<name>.
    Returns tune.json's content (runs, best, plain, profile) and `folder`; best is None when no run finished."""
    import tunesmith as ts

    recipe = recipe if isinstance(recipe, Recipe) else load(recipe)
    budget = budget or (recipe.search.budget if recipe.search else None)
    if not budget:
        raise RecipeError("tune", ["give a time budget (--budget 15m, budget=\"15m\" or search.budget)"])
    try:
        total_s = seconds(budget)
    except ValueError as e:
        raise RecipeError("tune", [f"budget: {e}"]) from None
    if total_s < MIN_BUDGET_S:                      # less than the probe run needs: nothing could be compared
        raise TunesmithError(f"budget {budget} is too small to run anything: tune needs at least "
                             f"{MIN_BUDGET_S:g}s (a probe run, then the plain recipe); e.g. --budget 5m")
    start = time.monotonic()
    deadline = start + total_s
    folder = Path(folder or Path("runs") / f"tune-{recipe.name or recipe.task}")
    folder.mkdir(parents=True, exist_ok=True)
    prof = profile(recipe)
    # the rates and batch size the plain recipe would train with (unset: tunesmith/defaults.py), concrete for the plan
    recipe = with_values(recipe, {"train.learning_rate": defaults.learning_rate(recipe),
                                  "train.batch_size": defaults.batch_size(recipe, prof["rows"])})
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

    # tune's plain run trains at least train.min_steps; on small data the first rung is a third of that, so
    # candidates are compared after enough steps to differ (one epoch of 15 steps ties them at the majority class)
    # (epochs: auto is raced as 3 epochs, raised to train.min_steps as auto would train at least)
    plain_epochs = max(3 if recipe.train.epochs == "auto" else recipe.train.epochs,
                       recipe.train.min_steps / per_epoch)
    cands = candidates(recipe, prof)
    rungs, r = [], max(1, math.ceil(recipe.train.min_steps / 3 / per_epoch))
    n = len(cands)
    while n >= 1 and r <= max(plain_epochs * 3, 1):
        rungs.append((n, r))
        if n == 1:
            break
        n, r = math.ceil(n / 3), r * 3
    total = estimate(plain_epochs) + sum(k * estimate(e) for k, e in rungs)
    race = " -> ".join(f"{k} x {e} epochs" for k, e in rungs)
    say(f"plan: plain recipe ({round(plain_epochs, 1):g} epochs), then {race}"
        f" ({', '.join(c[0] for c in cands)}); step {step_s:.3f}s, {per_epoch} steps/epoch, run overhead "
        f"{overhead:.1f}s; estimated {total:.0f}s of {seconds(budget):.0f}s budget")

    results = []

    def attempt(name: str, values: dict, epochs: float) -> dict | None:
        if time.monotonic() + estimate(min(epochs, 1)) > deadline:
            say(f"tune: skipping {name} ({epochs:g} epochs): does not fit in the budget left")
            return None
        run_dir = folder / f"{len(results):02d}-{name.replace(' ', '-').replace('/', '-')}-{epochs:g}ep"
        try:
            run = ts.train(with_values(recipe, {**values, "train.epochs": epochs, "train.log_every": 1}), run_dir,
                           callbacks=[stop])
        except Exception as e:                      # one candidate that cannot run (e.g. LoRA on an unknown
            if not values:                          # architecture) does not end the race; the plain recipe does
                raise
            say(f"tune: {name} failed: {type(e).__name__}: {e}")
            results.append({"name": name, "epochs": epochs, "run_dir": str(run_dir), "values": values,
                            "score": None, "test": None, "stopped": f"failed: {type(e).__name__}"})
            return None
        row = {"name": name, "epochs": epochs, "run_dir": str(run_dir), "values": values,
               "score": best_validation(run.history, recipe.train.metric, recipe.direction),
               "n": next((r.get("n_examples") for r in run.history if r.get("split") == "validation"), None),
               "test": run.metrics.get(recipe.train.metric),
               "stopped": run.history[-1].get("stopped") if run.history else None}
        results.append(row)
        return row

    plain = attempt("plain", {}, plain_epochs)
    if plain is None and not results:               # the probe spent the budget: say so rather than exit 1 silently
        raise TunesmithError(f"budget {budget}: the probe run took {overhead + step_s * len(steps):.0f}s and left no "
                             f"time for the plain recipe; give at least --budget "
                             f"{math.ceil(2 * (overhead + step_s * len(steps)) + estimate(1))}s")
    if plain:                                       # the epochs it trained, train.min_steps included
        plain["epochs"] = round(plain_epochs, 1)
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
    out = finish(recipe, folder, results, plain, prof, time.monotonic() - start, say)
    return {**out, "folder": str(folder)}


def standard_error(metric: str, score: float, n: int | None) -> float:
    """Noise of a validation score on n rows: binomial for accuracy (a mean of n right/wrong outcomes); other
    metrics have no closed form here (0: no margin)."""
    return math.sqrt(score * (1 - score) / n) if metric == "accuracy" and n else 0.0


def choose(results: list[dict], plain: dict | None, metric: str, direction: str) -> tuple[dict | None, float]:
    """The best run, by the one-standard-error rule: a candidate replaces the plain recipe only when its
    validation score beats the plain recipe's by more than that score's standard error. Small validation splits
    (40 rows: +-0.07 accuracy) otherwise pick noise: on 9 small-data folds, the 5 where a candidate scored
    highest on validation gave 2 losses and 3 ties against the plain recipe on the test rows, no win
    (docs/benchmarks.md). Returns (best, margin)."""
    sign = 1 if direction == "max" else -1
    done = [r for r in results if r["score"] is not None]
    if not done:
        return None, 0.0
    top = max(done, key=lambda r: sign * r["score"])
    if plain is None or plain["score"] is None or top is plain:
        return top, 0.0
    margin = standard_error(metric, plain["score"], plain.get("n"))
    return (top if sign * (top["score"] - plain["score"]) > margin else plain), margin


def finish(recipe, folder: Path, results: list[dict], plain: dict | None, prof: dict, elapsed: float, say) -> dict:
    m = recipe.train.metric
    best, margin = choose(results, plain, m, recipe.direction)
    if best is plain and margin:
        say(f"tune: the plain recipe stays best: no candidate beat its validation {m} ({plain['score']:.4f}) by "
            f"more than one standard error ({margin:.4f} on {plain['n']} rows)")
    out = {"metric": m, "profile": prof, "seconds": elapsed, "runs": results, "best": best, "plain": plain,
           "margin": margin}
    io.write_json(folder / "tune.json", out, say)
    if best:
        shutil.copyfile(Path(best["run_dir"]) / "recipe.yaml", folder / "best.yaml")
    rows = [[r["name"], f"{r['epochs']:g}", r["score"], r["test"],
             (("best " if r is best else "") + (f"({r['stopped']})" if r["stopped"] else "")).strip()]
            for r in results]
    say("\n" + io.table(["run", "epochs", f"{m} val", f"{m} test", "note"], rows))
    if best and plain and plain["test"] is not None and best["test"] is not None:
        say(f"best vs plain recipe: {m} {best['test']:.4f} vs {plain['test']:.4f} on the test split "
            f"({best['test'] - plain['test']:+.4f}); best run {best['run_dir']}; recipe {folder / 'best.yaml'}")
    say(f"tune: {elapsed:.0f}s spent")
    return out
