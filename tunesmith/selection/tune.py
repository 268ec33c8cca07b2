"""`ts.tune(recipe, budget="15m")` and `tunesmith tune RECIPE --budget 15m`: automated fine-tuning within a
wall-time budget, in a tune folder (default runs/tune-<recipe name or task>).

1. cut the data once (folder/data: every candidate sees the same rows, the test rows reach no choice), profile it
   (rows, classes, balance, tokens, LoRA targets: selection/prepare.py) and measure a step (a 5-step probe run);
2. plan, printed before anything else trains: the plain recipe, then the candidates the recipe's task declares
   (Recipe.search_space: head only, top blocks, full at two rates, LoRA where the model has LoRA targets;
   causal-lm: LoRA rates and ranks around the plain recipe's, strongest first). Scoring: the validation split, or
   below SMALL_ROWS rows of train + validation the mean of K held-out folds (selection/cv.py) where the plain
   recipe's K folds fit FOLD_SHARE of the budget, on the metric the task names (Recipe.tune_metric: causal-lm
   with eval.generate scores generated answers). Under K folds (or integer epochs) candidates race by successive
   halving: every one trains r epochs, the best third 3r, and so on. On one validation split with epochs: auto
   every run trains to its own plateau: the plain recipe first (at most PLAIN_SHARE of the time left), then the
   candidates one at a time, strongest first, while one and the refit fit (a chat model needs a hundred steps
   or more before candidates differ: short rungs compare noise);
3. spend what is left (selection/race.py): more epochs for leaders still improving, learning rates x3 and /3
   around the best, more seeds for the top configurations, while a run and the refit fit in the time left
   (estimates from measured run times); every run carries a Deadline callback at the budget less the refit of
   the best so far: past it, it raises StopTraining, so the run ends after the current step with one evaluation;
4. refit the chosen configuration on train + validation for the epochs of its best checkpoint: the final model
   (folder/final), whose test metric is compared with the plain recipe's. Without time for the refit, the final
   model is the chosen run (one split) or the plain recipe's own run (K folds), never an untrained one.
It ends with the table of runs against the plain recipe, tune.json and best.yaml in the tune folder.
"""
from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path

import yaml

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.recipe import Recipe, RecipeError, UsageError, load
from tunesmith.selection.prepare import profile, split_once
from tunesmith.selection.race import TOP, Deadline, Race, Timing, refit_epochs, steps_per_epoch
from tunesmith.selection.search import with_values
from tunesmith.selection.space import has_key, seconds

MIN_BUDGET_S = 5.0                                  # a probe run of a tiny model on CPU takes about that
# candidates are scored by K-fold below this many train + validation rows: the validation split (10%) is then
# under 200 rows, where an accuracy near 0.8 has a standard error of 0.028 or more, as large as the gaps between
# candidates (84 rows picked a 9-epoch run at 0.714 that scored 0.644 on test, below a 3-epoch one: issue 19);
# K folds score every pooled row (2,000 rows: 0.009) at K runs a candidate, seconds to minutes at this size
SMALL_ROWS = 2000
FOLDS = 3                                           # every row scored at 3/5 of 5-fold's cost (folds train on 2/3)
AUTO_EPOCHS = 3                                     # the plain run of a recipe whose epochs is not a number (auto)
# K-fold scoring only when the plain recipe's K folds, its refit and its run as `train` runs it fit in this share
# of the time left, the rest being the candidates' (chat-360, SmolLM2 + LoRA on 2 cores: 3 folds of the plain
# recipe took 257-397 s of a 10-minute budget and no candidate ran); else one validation split
FOLD_SHARE = 1 / 3
PLAIN_SHARE = 0.5       # epochs: auto on one split: the plain run stops at this share of the time left; the rest
                        # holds its refit (its best epochs again on 1/8 more rows) and candidates
CANDIDATE_SPAN = 1.5    # epochs: auto on one split: a candidate runs at most this many times the plain run's time


def candidates(recipe: Recipe, prof: dict, learning_rate: float) -> list[tuple[str, dict]]:
    """(name, recipe keys) to race: the space the recipe's task declares (Recipe.search_space)."""
    return recipe.search_space(prof["blocks"], learning_rate, prof["lora"])


def number(value) -> float | None:
    """A recipe value that is a number (epochs may be "auto", a learning rate None: resolved at training)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def scoring(recipe: Recipe, task, tables: dict, say) -> int | None:
    """Folds to score candidates by, or None (one validation split). search.cv when the recipe sets it; else K-fold
    below SMALL_ROWS rows of train + validation; never when the folds cannot be cut (a class with fewer rows)."""
    from tunesmith.selection.cv import assignments

    pool = tables["train"].rows + tables["validation"].rows
    folds = recipe.search.cv if recipe.search and recipe.search.cv else FOLDS if len(pool) < SMALL_ROWS else None
    if folds:
        try:
            assignments(recipe, pool, [task.stratify_key(r) for r in pool], folds, 1)
        except TunesmithError as e:
            say(f"tune: scoring on the validation split, not by {folds}-fold cross-validation: {e}")
            return None
    return folds


def tune(recipe, folder: str | Path | None = None, budget: str | None = None, say=print) -> dict:
    """Plan, race, spend what is left, refit on train + validation and compare, within `budget` (wall time, e.g.
    "15m"; default the recipe's search.budget). recipe: a Recipe, or what ts.load_recipe takes (a YAML path, a
    dict); folder: default runs/tune-<name>. Returns tune.json's content (runs, best, plain, final, model: the
    final model's run folder, profile) and `folder`; best is None when no run finished."""
    import tunesmith as ts

    recipe = recipe if isinstance(recipe, Recipe) else load(recipe)
    budget = budget or (recipe.search.budget if recipe.search else None)
    if not budget:
        raise RecipeError("tune", ["give a time budget (--budget 15m, budget=\"15m\" or search.budget)"])
    try:
        total_s = seconds(budget)
    except ValueError as e:
        raise UsageError(f"budget {budget}: {e}") from None
    if total_s < MIN_BUDGET_S:                      # less than the probe run needs: nothing could be compared
        raise UsageError(f"budget {budget} is too small to run anything: tune needs at least "
                             f"{MIN_BUDGET_S:g}s (a probe run, then the plain recipe); e.g. --budget 5m")
    start = time.monotonic()
    deadline = start + total_s
    folder = Path(folder or Path("runs") / f"tune-{recipe.name or recipe.task}")
    made = io.first_missing(folder)                 # what a failure removes again
    # data or model errors: raised while reading, before split_once writes folder/data
    fixed, refit_recipe, task, tables = split_once(recipe, folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {split: len(t.rows) for split, t in tables.items()}
    prof = profile(fixed, task, tables)
    say(f"data: {prof['rows']} train rows, {prof['classes'] or '-'} classes (largest/smallest {prof['balance']}), "
        f"median {prof['tokens']} tokens; model: {prof['blocks']} blocks")
    folds = scoring(recipe, task, tables, say)
    t0 = time.monotonic()                           # probe: load + 5 steps + one evaluation + final test
    probe = ts.train(with_values(fixed, {"train.max_steps": 5, "train.log_every": 1}), folder / "probe",
                     callbacks=[Deadline(deadline)])
    overhead = time.monotonic() - t0
    ran = probe.recipe.train                        # what the probe ran: a batch size or rate left unset is resolved
    batch = int(number(ran.batch_size) or number(recipe.train.batch_size) or 32)
    lr = number(ran.learning_rate) or number(recipe.train.learning_rate) or 5e-5
    steps = [r for r in probe.history if "samples_per_s" in r]
    # one step per record; the first carries one-time costs (allocation, kernel choice): the median of the rest
    step_s = statistics.median(batch * ran.grad_accum / r["samples_per_s"] for r in steps[1:] or steps)
    overhead = max(overhead - step_s * len(steps), 0.0)
    timing = Timing(step_s, overhead, batch)
    per_epoch = steps_per_epoch(rows["train"], batch)
    pooled = rows["train"] + rows["validation"]
    race = Race(fixed, folder, deadline, [], timing, rows["train"], pooled, folds, lr, say)
    metric = race.metric

    # tune's plain run trains the recipe's epochs exactly; under K folds epochs: auto is raced as AUTO_EPOCHS,
    # raised to train.min_steps as auto would train at least; on small data the first rung is a third of
    # min_steps, so candidates are compared after enough steps to differ (one epoch of 15 steps ties them at the
    # majority class). On one validation split epochs: auto stays auto (Race.auto): every run finds its plateau
    min_steps = fixed.dump()["train"].get("min_steps") or 0
    plain_epochs = number(recipe.train.epochs) or max(AUTO_EPOCHS, min_steps / per_epoch)
    split_note = ""
    if folds and not (recipe.search and recipe.search.cv):
        folds, split_note = folds_fit(race, plain_epochs, time.monotonic() - start)
    race.auto = folds is None and number(recipe.train.epochs) is None
    cands = candidates(fixed, prof, lr)
    rungs, r = [], max(1, math.ceil(min_steps / 3 / per_epoch))
    n = len(cands) if not race.auto else 0
    while n >= 1 and r <= max(plain_epochs * 3, 1):
        rungs.append((n, r))
        if n == 1:
            break
        n, r = math.ceil(n / 3), r * 3
    top = rungs[-1][1] if rungs else 1
    names = ", ".join(c[0] for c in cands) or "none: the task declares no candidates for this model"
    if race.auto:
        total = race.estimate("plain", plain_epochs) * (1 + len(cands)) + race.estimate("-", plain_epochs, None,
                                                                                       pooled)
        plan = (f"the plain recipe as `tunesmith train` runs it (epochs auto: to its own plateau; at most "
                f"{PLAIN_SHARE:.0%} of the time left, the rest holds its refit), then one candidate at a time, "
                f"strongest first, each under epochs auto (at most {CANDIDATE_SPAN:g}x the plain run's time) while "
                f"it and the refit of the best fit: {names}")
    else:
        total = (race.estimate("plain", plain_epochs, None) * (2 if folds else 1)
                 + sum(k * race.estimate("-", e) for k, e in rungs) + race.estimate("-", top, None, pooled))
        plan = (f"plain recipe ({round(plain_epochs, 1):g} epochs), then "
                + " -> ".join(f"{k} x {e} epochs" for k, e in rungs) + f" ({names})")
    say(f"plan{' (one validation split: K folds do not fit the budget)' if split_note else ''}: {plan}; then, "
        f"while time is left: more epochs for leaders still improving, learning rates x3 and /3 around the best, "
        f"more seeds for the top {TOP}; step {step_s:.3f}s, {per_epoch} steps/epoch, run overhead {overhead:.1f}s; "
        f"estimated {total:.0f}s for the plan{' (plain run at ' + f'{plain_epochs:g} epochs)' if race.auto else ''}"
        f" of {total_s:.0f}s budget")
    if folds:
        say(f"scoring: {folds}-fold cross-validation on train + validation ({pooled} rows, fewer than "
            f"{SMALL_ROWS}: one validation split of {rows['validation']} rows is too noisy to choose by): each "
            f"candidate's {metric} is the mean of its {folds} held-out folds")
    else:
        say(f"scoring: validation {metric} on {rows['validation']} rows (best checkpoint){split_note}")
    say(f"final model: the chosen recipe trained again on train + validation ({pooled} rows) for the epochs of "
        f"its best checkpoint; test {metric} on the {rows['test']} test rows, untouched until then")

    # the plain run keeps time for its refit (and, under K folds, its run as `tunesmith train` runs it)
    held = (1 - PLAIN_SHARE) * race.left()
    if race.auto:
        plain = race.attempt("plain", {}, None, reserve=held)
    else:
        refit_s = race.estimate("plain", plain_epochs, None, pooled) * (2 if folds else 1)
        plain = race.attempt("plain", {}, plain_epochs, reserve=min(refit_s, held))
    if plain is None and not race.results:          # the plain recipe does not fit: say what, and what to do
        for left in ([made] if made else [folder / "probe", folder / "data"]):
            shutil.rmtree(left, ignore_errors=True)             # and leave no probe run
        raise does_not_fit(race, budget, time.monotonic() - start, plain_epochs, per_epoch)
    test_plain = None
    if plain and folds:                             # the plain recipe as `tunesmith train` runs it: the baseline
        test_plain = plain["test"] = plain_test(fixed, folder, race, say)
    if race.auto and plain:                         # candidates to their own plateau: how long plain took to its
        race.auto_epochs = plain["trained"] or 1    # best is what one needs to be comparable
        race.auto_evals = (plain.get("evals") or race.auto_epochs) / race.auto_epochs
        reach = plain["best_epochs"] or race.auto_epochs
        for name, values in cands:
            race.attempt(name, values, None, need=race.estimate(name, reach, None, per_epoch=race.auto_evals),
                         limit=CANDIDATE_SPAN * plain["seconds"])
    alive = cands
    for k, epochs in rungs:
        scored = []
        for name, values in alive[:k]:
            row = race.attempt(name, values, epochs)
            if row and row["score"] is not None:
                scored.append(((row["score"] if race.direction == "max" else -row["score"]), name, values))
        if not scored:
            break
        scored.sort(key=lambda x: -x[0])
        alive = [(n, v) for _, n, v in scored]
    planned, left = len(race.results), race.left()
    extra = race.spend(top) if race.results else 0
    if extra:
        say(f"tune: the plan ended with {left:.0f}s left: {extra} more run(s) (more epochs, learning rates, seeds)")
    out = finish(recipe, refit_recipe, folder, race, plain, test_plain, prof, start, planned, folds, say)
    return {**out, "folder": str(folder)}


def folds_fit(race: Race, plain_epochs: float, setup: float) -> tuple[int | None, str]:
    """(folds, "") when K-fold scoring fits the budget: the plain recipe's K folds, its refit and its run as
    `tunesmith train` runs it within FOLD_SHARE of the time left; else (None, why, in words)."""
    folds, left = race.folds, race.left()
    need = race.estimate("plain", plain_epochs, folds) + 2 * race.estimate("plain", plain_epochs, None,
                                                                           race.refit_rows)
    if need <= FOLD_SHARE * left:
        return folds, ""
    race.folds = None
    return None, (f"; not by {folds}-fold cross-validation: the plain recipe's {folds} folds, its refit and its "
                  f"run on train would take about {need:.0f}s of the {left:.0f}s left, leaving too little for "
                  f"candidates; a budget of {math.ceil(setup + need / FOLD_SHARE)}s or more scores by {folds} folds")


def does_not_fit(race: Race, budget: str, setup: float, plain_epochs: float, per_epoch: int) -> TunesmithError:
    """The error when not even the plain recipe (with its refit) fits what the probe left of the budget."""
    t = race.timing
    auto = number(race.recipe.train.epochs) is None
    epochs = f"epochs auto, counted as {plain_epochs:g}" if auto else f"{plain_epochs:g} epochs"
    run = race.estimate("plain", plain_epochs)
    refit = race.estimate("plain", plain_epochs, None, race.refit_rows)
    scored = f" x {race.folds} folds" if race.folds else ""
    if race.left() <= 0:                            # the probe itself spent the budget
        return TunesmithError(f"budget {budget}: reading the data and the 5-step probe run took {setup:.0f}s and "
                              f"left no time for the plain recipe; give at least --budget "
                              f"{math.ceil(setup + run + refit)}s")
    return TunesmithError(
        f"budget {budget}: the plain recipe does not fit: reading the data and the 5-step probe run took "
        f"{setup:.0f}s, and the plain recipe ({epochs} of {per_epoch} steps{scored}, at the measured "
        f"{t.step_s:.2f}s a step and {t.overhead_s:.0f}s a run) needs about {run:.0f}s, its refit on train + "
        f"validation {refit:.0f}s more, with {max(race.left(), 0):.0f}s left; give at least --budget "
        f"{math.ceil(setup + run + refit)}s" + ("" if auto else ", or fewer train.epochs"))


def plain_test(fixed: Recipe, folder: Path, race: Race, say) -> float | None:
    """The plain recipe's test metric as `tunesmith train` gives it (K-fold scores say nothing of the test rows):
    its own epochs (epochs: auto stays auto), folder/plain-run: the final model when no refit can run."""
    import tunesmith as ts

    until = race.deadline - race.reserve()          # the refit of the best so far keeps its time
    if until <= time.monotonic():
        return None
    run = ts.train(with_values(fixed, {"train.log_every": 1}), folder / "plain-run", callbacks=[Deadline(until)])
    return run.metrics.get(race.metric)


def standard_error(metric: str, score: float, n: int | None) -> float:
    """Noise of a validation score on n rows: binomial for accuracy and exact match (a mean of n right/wrong
    outcomes); other metrics have no closed form here (0: no margin)."""
    return math.sqrt(max(score * (1 - score), 0.0) / n) if metric in ("accuracy", "exact_match") and n else 0.0


def choose(results: list[dict], plain: dict | None, metric: str, direction: str) -> tuple[dict | None, float]:
    """The best run (or configuration: mean over seeds), by the one-standard-error rule: a candidate replaces the
    plain recipe only when its validation score beats the plain recipe's by more than that score's standard
    error. Small validation splits (40 rows: +-0.07 accuracy) otherwise pick noise: on 9 small-data folds, the 5
    where a candidate scored highest on validation gave 2 losses and 3 ties against the plain recipe on the test
    rows, no win (docs/benchmarks.md). Returns (best, margin)."""
    sign = 1 if direction == "max" else -1
    done = [r for r in results if r["score"] is not None]
    if not done:
        return None, 0.0
    top = max(done, key=lambda r: sign * r["score"])
    if plain is None or plain["score"] is None or top is plain:
        return top, 0.0
    margin = standard_error(metric, plain["score"], plain.get("n"))
    return (top if sign * (top["score"] - plain["score"]) > margin else plain), margin


def refit(race: Race, refit_recipe: Recipe, config: dict, folder: Path, pooled: int, say) -> dict | None:
    """The chosen configuration trained again on train + validation: its keys, its first seed, the epochs of its
    best checkpoint, the last step's weights kept (train.keep: last: its validation rows are rows it trained on,
    so they cannot choose a checkpoint). None when no time is left for it (the best run is then the final model)."""
    import tunesmith as ts

    epochs = refit_epochs(config)
    expected = race.refit_estimate(config)
    fallback = fallback_model(race, config)[1]
    if race.left() <= 0:
        say(f"tune: no time left to refit {config['name']} on train + validation (about {expected:.0f}s); {fallback}")
        return None
    keys = {**config["values"], "train.epochs": epochs, "train.keep": "last", "train.log_every": 1,
            "train.seed": config["runs"][0]["seed"]}
    if has_key(type(refit_recipe), "train.min_steps"):
        keys["train.min_steps"] = 0
    say(f"tune: refitting {config['name']} on train + validation ({pooled} rows) for {epochs} epochs "
        f"(about {expected:.0f}s)")
    # at most one run's expected time past the budget: the deadline moves by the refit's own estimate
    try:
        run = ts.train(with_values(refit_recipe, keys), folder / "final",
                       callbacks=[Deadline(race.deadline + expected)])
    except Exception as e:                          # the runs stay: the best one is then the final model
        say(f"tune: the refit failed ({type(e).__name__}: {e}); {fallback}")
        return None
    return {"name": config["name"], "epochs": epochs, "run_dir": str(run.path), "rows": pooled,
            "test": run.metrics.get(race.metric), "values": config["values"],
            "stopped": run.history[-1].get("stopped") if run.history else None}


def fallback_model(race: Race, config: dict) -> tuple[str | None, str]:
    """(run folder, in words) of the final model when `config` cannot be refit: its first run on one validation
    split (trained on train, its best checkpoint); under K folds, whose runs are cv folders, the plain recipe's
    run as `tunesmith train` runs it (folder/plain-run), never an untrained one."""
    if not race.folds:
        run = config["runs"][0]["run_dir"]
        return run, f"the final model is its run {run}, trained on train alone"
    plain = race.folder / "plain-run"
    if (plain / "eval.json").exists():
        return str(plain), f"the final model is the plain recipe's run {plain}, trained on train alone"
    return None, "no final model (its runs are cv folders and the plain recipe's own run did not finish)"


def finish(recipe: Recipe, refit_recipe: Recipe, folder: Path, race: Race, plain: dict | None,
           test_plain: float | None, prof: dict, start: float, planned: int, folds: int | None, say) -> dict:
    m, results = race.metric, race.results
    configs = race.configs()
    plain_config = next((c for c in configs if c["name"] == "plain"), None)
    best, margin = choose(configs, plain_config, m, race.direction)
    if best is plain_config and margin:
        say(f"tune: the plain recipe stays best: no candidate beat its {m} ({plain_config['score']:.4f}) by "
            f"more than one standard error ({margin:.4f} on {plain_config['n']} rows)")
    pooled = race.refit_rows
    final = refit(race, refit_recipe, best, folder, pooled, say) if best else None
    if test_plain is None and plain:
        test_plain = plain["test"]
    elapsed = time.monotonic() - start
    summary = {k: best[k] for k in ("name", "values", "epochs", "score", "n", "seeds", "best_epochs")} if best else None
    # the model tune ends with: the refit, else the best configuration's first run (one split: a run folder), else
    # (K folds) the plain recipe's run as `tunesmith train` runs it
    model = final["run_dir"] if final else fallback_model(race, best)[0] if best else None
    out = {"model": model, "metric": m, "profile": prof, "seconds": elapsed, "budget_seconds": race.deadline - start,
           "scoring": {"folds": folds, "rows": pooled if folds else plain and plain["n"]},
           "planned_runs": planned, "runs": results, "best": summary, "plain": plain, "plain_test": test_plain,
           "final": final, "margin": margin}
    io.write_json(folder / "tune.json", out, say)
    if best:
        keys = {**best["values"], "train.epochs": refit_epochs(best)}
        if has_key(type(recipe), "train.min_steps"):
            keys["train.min_steps"] = 0
        io.atomic_write(folder / "best.yaml", yaml.safe_dump(with_values(recipe, keys).dump(), sort_keys=False))
    score = f"{m} {f'cv{folds}' if folds else 'val'}"

    def note(r):
        chosen = best and r["name"] == best["name"] and r["epochs"] == best["epochs"]
        mean = f" (mean {best['score']:.4f} over {best['seeds']} seeds)" if chosen and best["seeds"] > 1 else ""
        return (("best" + mean + " " if chosen else "") + ("(extra) " if results.index(r) >= planned else "")
                + (f"({r['stopped']})" if r["stopped"] else "")).strip()

    def epochs(r):
        e = r["epochs"] if r["epochs"] is not None else r.get("trained")
        return "-" if e is None else f"{e:g}"

    rows = [[r["name"], epochs(r), r["seed"], r["score"], r["test"], note(r)] for r in results]
    if final:
        rows.append([f"final: {final['name']}", final["epochs"], best["runs"][0]["seed"], None, final["test"],
                     f"refit on train + validation ({final['rows']} rows)"
                     + (f" ({final['stopped']})" if final["stopped"] else "")])
    say("\n" + io.table(["run", "epochs", "seed", score, f"{m} test", "note"], rows))
    shown = final["test"] if final else model and (test_plain if folds else best["runs"][0]["test"])
    if best and shown is not None and test_plain is not None:
        what = "refit on train + validation" if final else "trained on train"
        name = best["name"] if final or not folds else "plain"
        say(f"best vs plain recipe: {m} {shown:.4f} ({name}, {what}) vs {test_plain:.4f} (the plain "
            f"recipe) on the test split ({shown - test_plain:+.4f}); final model {model}; recipe "
            f"{folder / 'best.yaml'}")
    say(f"tune: {elapsed:.0f}s spent of {race.deadline - start:.0f}s ({len(results)} runs, {planned} planned)")
    return out
