"""tune's runs: one candidate scored (one run on the validation split, or K folds of train + validation), the
time each is expected to take (measured, not guessed, once one like it ran), the configurations ranked over their
seeds, what to try next while budget is left, and the refit of the chosen one on train + validation.

A candidate is (name, recipe keys, epochs, seed); a configuration is (name, epochs): its runs over seeds are
averaged. Time: the probe gives seconds per step and per run; every finished run then gives a ratio of measured to
predicted seconds, per name (head-only on cached features is far cheaper than full fine-tuning), used for the
next estimate; no run starts unless it and the refit of the current best fit in what is left.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith.recipe import Recipe
from tunesmith.run import Callback, StopTraining
from tunesmith.selection.search import best_validation, with_values
from tunesmith.selection.space import has_key

EPOCHS_CAP = 3          # spend: a leader's epochs grow x3 while its best checkpoint is its last, to 3x the top rung
TOP = 3                 # spend: configurations that get more seeds
SEEDS = (3, 5, 10)      # spend: seeds each of the top configurations reaches, then the best two, then the best
LR_RANGE = (1e-6, 1e-1)


class Deadline(Callback):
    """Past `deadline` (a time.monotonic()), the run stops after the current step with one evaluation."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_log(self, record: dict) -> None:
        if not record.get("summary") and time.monotonic() >= self.deadline:
            raise StopTraining("time budget spent")


@dataclass
class Timing:
    """The probe's measurements: seconds of one optimizer step, of a run's fixed costs (load, evaluations,
    saving), and the batch size they were measured at."""
    step_s: float
    overhead_s: float
    batch_size: int


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return max(math.ceil(rows / batch_size), 1)


def best_epochs(history: list[dict], metric: str, direction: str) -> float | None:
    """The epochs trained when the best validation value was reached, read as the (fractional) epoch of the
    train record at that step; of evaluations tied at the best, the last (a run that never left the majority
    class, or sat on a plateau, says nothing for fewer epochs)."""
    evals = [r for r in history if r.get("split") == "validation" and metric in r]
    if not evals:
        return None
    top = (max if direction == "max" else min)(r[metric] for r in evals)
    best = [r for r in evals if r[metric] == top][-1]
    epochs = [r["epoch"] for r in history if "split" not in r and r.get("step") == best["step"] and "epoch" in r]
    return float(epochs[0]) if epochs else None


def trained_epochs(history: list[dict]) -> float | None:
    """Epochs a run trained (its last train record's fractional epoch)."""
    epochs = [r["epoch"] for r in history if "split" not in r and "epoch" in r and not r.get("summary")]
    return float(epochs[-1]) if epochs else None


def evaluations(histories: list[list[dict]]) -> tuple[int, float]:
    """(validation evaluations, their seconds) over the runs' histories: time that scales with evaluations, not
    with steps (under epochs: auto a chat model generates answers at each one: a third of its run)."""
    n = sum(r.get("split") == "validation" for h in histories for r in h)
    return n, sum(r.get("eval_seconds", 0.0) for h in histories for r in h if r.get("summary"))


def run_candidate(recipe: Recipe, run_dir: Path, folds: int | None, callbacks: list, metric: str, direction: str,
                  until: float | None = None) -> dict:
    """Train and score one candidate: {score, n (rows scored), test, stopped, best_epochs, trained (epochs),
    folds (fold scores)}.
    One run: its best validation value of `metric`, or, when the validation evaluation does not report it (a
    metric of the final evaluation: generated answers' exact match), the saved model scored on the run's
    validation rows. K folds: the mean of the held-out folds' `metric` (each fold's best checkpoint); no fold
    starts after `until` (a time.monotonic())."""
    import tunesmith as ts

    keep, keep_dir = recipe.train.metric, recipe.direction        # what the loop's checkpoint choice used
    if folds:
        from tunesmith.selection.cv import cross_validate

        res = cross_validate(recipe, run_dir, folds=folds, callbacks=callbacks, say=lambda *a: None,
                             pool=("train", "validation"), predictions=False, until=until)
        runs = [ts.Run(Path(run_dir) / name) for name in res["runs"]]
        epochs = [e for e in (best_epochs(r.history, keep, keep_dir) for r in runs) if e is not None]
        trained = [e for e in (trained_epochs(r.history) for r in runs) if e is not None]
        stopped = next((r.history[-1].get("stopped") for r in runs if r.history and r.history[-1].get("stopped")),
                       None)
        if len(runs) < folds:
            stopped = f"time budget spent: {len(runs)} of {folds} folds"
        values = res["metrics"][metric]["values"] if metric in res["metrics"] else None
        evals, eval_s = evaluations([r.history for r in runs])
        return {"score": statistics.mean(values) if values else None, "folds": values, "n": res["rows"],
                "evals": evals, "eval_seconds": eval_s,
                "test": None, "stopped": stopped, "best_epochs": statistics.mean(epochs) if epochs else None,
                "trained": statistics.mean(trained) if trained else None}
    run = ts.train(recipe, run_dir, callbacks=callbacks)
    validation = [r for r in run.history if r.get("split") == "validation"]
    score = best_validation(run.history, metric, direction)
    n = next((r.get("n_examples") for r in validation), None)
    if score is None and validation:                # not an evaluation metric: the kept model on the same rows
        rows = run.path / "data" / "validation.jsonl"
        score = run.load().evaluate(rows).get(metric)
        n = sum(1 for line in rows.read_text().splitlines() if line.strip())
    evals, eval_s = evaluations([run.history])
    return {"score": score, "folds": None, "n": n, "test": run.metrics.get(metric), "evals": evals,
            "eval_seconds": eval_s,
            "stopped": run.history[-1].get("stopped") if run.history else None,
            "best_epochs": best_epochs(run.history, keep, keep_dir), "trained": trained_epochs(run.history)}


def refit_epochs(config: dict) -> int:
    """Whole epochs up to a configuration's best checkpoint (the mean over its seeds and folds)."""
    e = config["best_epochs"] or config["epochs"] or config["runs"][0].get("trained") or 1
    return max(math.ceil(round(e, 3)), 1)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", name).strip("-")


class Race:
    """The runs of one tune: attempt() trains and records one candidate, within the budget."""

    def __init__(self, recipe: Recipe, folder: Path, deadline: float, callbacks: list, timing: Timing,
                 rows: int, refit_rows: int, folds: int | None, base_lr: float, say=print):
        self.recipe, self.folder, self.deadline, self.callbacks = recipe, folder, deadline, callbacks
        self.timing, self.rows, self.refit_rows, self.folds = timing, rows, refit_rows, folds
        self.base_lr, self.say = base_lr, say
        self.metric, self.direction = recipe.tune_metric()
        self.results: list[dict] = []
        self.ratios: dict[str, float] = {}          # name -> measured / predicted seconds of its last run
        # epochs: auto races (one validation split): candidates train to their own plateau; their time is
        # estimated as the epochs the plain recipe trained under auto (set once it ran)
        self.auto, self.auto_epochs = False, 1.0
        self.eval_s, self.auto_evals = 0.0, 1.0     # seconds an evaluation; evaluations per epoch under auto

    # --- time ----------------------------------------------------------------------------------------
    def predicted(self, epochs: float, folds: int | None, rows: int | None = None) -> float:
        """Seconds from the probe alone: fixed costs + epochs x steps x step time; K folds train K runs, each
        on (K-1)/K of the pooled train + validation rows less the validation split cut for checkpoint choice
        (0.9)."""
        t, rows = self.timing, rows or (self.refit_rows if folds else self.rows)
        if folds:
            per = steps_per_epoch(math.ceil(rows * (folds - 1) / folds * 0.9), t.batch_size)
            return folds * (t.overhead_s + epochs * per * t.step_s)
        return t.overhead_s + epochs * steps_per_epoch(rows, t.batch_size) * t.step_s

    def ratio(self, name: str) -> float:
        if name in self.ratios:
            return self.ratios[name]
        return statistics.median(self.ratios.values()) if self.ratios else 1.0

    def estimate(self, name: str, epochs: float, folds: int | None = -1, rows: int | None = None,
                 per_epoch: float = 1.0) -> float:
        """Training time (the probe's prediction x the name's measured ratio) + `per_epoch` evaluations an epoch
        at the measured seconds of one (0 until a run measured it: the probe's overhead holds one)."""
        folds = self.folds if folds == -1 else folds
        return (self.predicted(epochs, folds, rows) * self.ratio(name)
                + epochs * per_epoch * (folds or 1) * self.eval_s)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run_estimate(self, name: str, epochs: float | None) -> float:
        """Seconds of one candidate as attempt() runs it: epochs None (epochs: auto) as the plain recipe's."""
        if epochs is None:
            return self.estimate(name, self.auto_epochs, per_epoch=self.auto_evals)
        return self.estimate(name, epochs)

    def refit_estimate(self, config: dict) -> float:
        """Seconds of the refit of `config`: one run on train + validation for its refit epochs."""
        return self.estimate(config["name"], refit_epochs(config), None, self.refit_rows)

    def reserve(self) -> float:
        """Seconds kept for the refit of the current best configuration (none before one is scored)."""
        ranked = self.configs()
        return self.refit_estimate(ranked[0]) if ranked else 0.0

    # --- runs ----------------------------------------------------------------------------------------
    def attempt(self, name: str, values: dict, epochs: float | None, seed: int | None = None,
                strict: bool = False, reserve: float | None = None, need: float | None = None,
                limit: float | None = None) -> dict | None:
        """Train one candidate unless it and the refit of the best so far cannot fit: `strict` (spending what is
        left) needs its whole estimate to fit; the planned race `need` seconds, by default one epoch of one run.
        The run stops at the budget less `reserve` (default: the refit of the best so far), so the refit keeps
        its time, and after `limit` seconds if given. epochs None: the recipe's own (epochs: auto)."""
        reserve = self.reserve() if reserve is None else reserve
        if need is None:
            need = self.run_estimate(name, epochs) if strict else self.estimate(name, min(epochs or 1, 1), None)
        until = self.deadline - reserve
        if limit is not None:
            until = min(until, time.monotonic() + limit)
        if need + reserve > self.left():
            if not strict:
                self.say(f"tune: skipping {name} ({epochs or 'recipe'} epochs): does not fit in the budget left")
            return None
        seed = self.recipe.train.seed if seed is None else seed
        keys = {**values, "train.log_every": 1, "train.seed": seed}
        if epochs is not None:
            keys["train.epochs"] = epochs
            if has_key(type(self.recipe), "train.min_steps"):
                keys["train.min_steps"] = 0         # rungs are counted in epochs exactly
        label = f"{epochs:g}ep" if epochs is not None else "recipe"
        run_dir = self.folder / f"{len(self.results):02d}-{slug(name)}-{label}-s{seed}"
        row = {"name": name, "values": values, "epochs": epochs, "seed": seed, "run_dir": str(run_dir)}
        t0 = time.monotonic()
        try:
            out = run_candidate(with_values(self.recipe, keys), run_dir, self.folds,
                                [Deadline(until), *self.callbacks], self.metric, self.direction, until)
        except Exception as e:                      # one candidate that cannot run (e.g. LoRA on an unknown
            if not values:                          # architecture) does not end the race; the plain recipe does
                raise
            self.say(f"tune: {name} failed: {type(e).__name__}: {e}")
            self.results.append({**row, "score": None, "test": None, "n": None, "folds": None, "best_epochs": None,
                                 "trained": None, "stopped": f"failed: {type(e).__name__}",
                                 "seconds": time.monotonic() - t0})
            return None
        row.update(out, seconds=time.monotonic() - t0)
        scored = "-" if row["score"] is None else f"{row['score']:.4f}"
        self.say(f"tune: {name}, {label}, seed {seed}: {self.metric} {scored} "
                 f"({f'mean of {self.folds} folds' if self.folds else 'validation'}) in {row['seconds']:.1f}s")
        if out.get("evals"):                        # evaluations timed apart: their number follows the epochs
            self.eval_s = out["eval_seconds"] / out["evals"]
        if not out.get("stopped"):                  # a run cut by the deadline says nothing of its full length
            train_s = max(row["seconds"] - (out.get("eval_seconds") or 0.0), 0.1 * row["seconds"])
            self.ratios[name] = train_s / max(self.predicted(epochs or out["trained"] or 1, self.folds), 1e-9)
        self.results.append(row)
        return row

    # --- ranking -------------------------------------------------------------------------------------
    def configs(self) -> list[dict]:
        """(name, epochs) over their seeds, best mean score first: name, values, epochs, score, n, seeds,
        runs (rows), best_epochs."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.results:
            if r["score"] is not None:
                groups.setdefault((r["name"], r["epochs"]), []).append(r)
        out = []
        for (name, epochs), runs in groups.items():
            done = [r["best_epochs"] for r in runs if r["best_epochs"] is not None]
            out.append({"name": name, "values": runs[0]["values"], "epochs": epochs, "runs": runs,
                        "score": statistics.mean(r["score"] for r in runs), "n": runs[0]["n"],
                        "seeds": len(runs), "best_epochs": statistics.mean(done) if done else None})
        sign = 1 if self.direction == "max" else -1
        return sorted(out, key=lambda c: -sign * c["score"])

    # --- spending what is left -----------------------------------------------------------------------
    def proposals(self, top_epochs: float) -> list[tuple[str, dict, float | None, int]]:
        """What to try next, most useful first, none tried before: more epochs for the two leaders whose best
        checkpoint was their last (still improving), learning rates x3 and /3 around the best, more seeds for
        the top configurations (their mean is what ranks them)."""
        ranked = self.configs()
        if not ranked:
            return []
        tried = {(r["name"], r["epochs"], r["seed"]) for r in self.results}
        base_seed = self.recipe.train.seed
        out = []
        for c in ranked[:2]:
            e, b = c["epochs"], c["best_epochs"]
            if e is not None and b is not None and b >= 0.9 * e and 3 * e <= EPOCHS_CAP * top_epochs:
                out.append((c["name"], c["values"], 3 * e, base_seed))
        best = ranked[0]
        lr = best["values"].get("train.learning_rate", self.base_lr)
        stem = re.sub(r"\s*lr [0-9.e+-]+$", "", best["name"])
        epochs = best["epochs"]                     # the plain recipe's own (auto) epochs: as many as it trained,
        if epochs is None and not self.auto:        # unless candidates race under auto themselves
            epochs = math.ceil(round(best["runs"][0]["trained"] or best["best_epochs"] or 1, 3))
        for f in (3, 1 / 3):
            new = float(f"{lr * f:.3g}")
            if LR_RANGE[0] <= new <= LR_RANGE[1]:
                out.append((f"{stem} lr {new:g}", {**best["values"], "train.learning_rate": new}, epochs, base_seed))
        for limit, k in ((SEEDS[0], TOP), (SEEDS[1], 2), (SEEDS[2], 1)):
            for c in ranked[:k]:
                seeds = {r["seed"] for r in c["runs"]}
                nxt = next(s for s in range(base_seed, base_seed + limit + len(seeds) + 1) if s not in seeds)
                if len(seeds) < limit:
                    out.append((c["name"], c["values"], c["epochs"], nxt))
        ran = {self.same(r["values"], r["epochs"], r["seed"]) for r in self.results}
        return [p for p in out if (p[0], p[2], p[3]) not in tried and self.same(*p[1:]) not in ran]

    def same(self, values: dict, epochs: float | None, seed: int) -> str:
        """What a run trains, whatever its name ("plain lr 0.0006" may be "lora r8 lr 0.0006")."""
        return repr((with_values(self.recipe, values).dump(), epochs, seed))

    def spend(self, top_epochs: float) -> int:
        """Run proposals while one fits with the refit of the current best after it; the number run."""
        ran = 0
        while True:
            reserve = self.reserve()
            fits = [p for p in self.proposals(top_epochs) if self.run_estimate(p[0], p[2]) + reserve <= self.left()]
            if not fits:
                return ran
            before = len(self.results)
            self.attempt(*fits[0], strict=True)
            if len(self.results) == before:         # did not start after all: nothing else will
                return ran
            ran += 1
