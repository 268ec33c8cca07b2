"""`ts.search(recipe)` and `tunesmith search`: Optuna TPE over the recipe's `search.space`, pruning on the
validation metric.

A study is a folder (default runs/search-<study name>; the study name defaults to the recipe's name or task):
  study.db          Optuna's SQLite storage (default; --storage postgresql://... shares a study across machines)
  trial-NNNN/       one run folder per trial (tunesmith.train through the public API), or a cv folder (search.cv)
  best.yaml         the best trial's resolved recipe: `tunesmith train best.yaml` trains that trial again
  trials.json       every trial: number, state, score, params, run folder
A trial is scored on its best checkpoint (the best validation value; with search.cv the mean held-out fold
metric). Workers share a study through its storage: each trial is taken by one worker; a worker that dies
stops its heartbeat, and the next worker to start a trial marks it failed and runs a retry with its parameters,
continuing the dead trial's run folder from its newest checkpoint where it can (`resumable`). Re-running the
same command resumes the study (finished trials are kept; the target counts them).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.recipe import QUOTE, Recipe, RecipeError, UsageError, load
from tunesmith.run import Callback, StopTraining
from tunesmith.safety import LOCK, Interrupted
from tunesmith.selection.space import Param, SearchConfig, default_space, seconds
from tunesmith.selection.storage import storage_error, storage_url


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise TunesmithError("tunesmith search needs optuna: pip install 'tunesmith[search]'") from None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)   # heartbeat API
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, QuietFailures) for f in logger.filters):
        logger.addFilter(QuietFailures())
    return optuna


class QuietFailures(logging.Filter):
    """Drops optuna's "Trial N failed ..." records (a traceback and a line) for a trial that raised a
    TunesmithError, which the search says in one line of its own, or that Ctrl-C stopped, where the search says how
    to resume. Any other failure keeps optuna's record and traceback."""

    def __init__(self):
        super().__init__()
        self.quiet: set[str] = set()                # trial numbers whose records are dropped

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split(" ", 2)
        trial = words[1] if words[0] == "Trial" and len(words) > 1 else None
        if record.exc_info and isinstance(record.exc_info[1], (TunesmithError, KeyboardInterrupt)):
            self.quiet.add(trial)
            return False
        return trial is None or trial not in self.quiet


def settings(recipe: Recipe) -> SearchConfig:
    return recipe.search or SearchConfig()


def space(recipe: Recipe) -> dict[str, Param]:
    return settings(recipe).space or default_space(recipe)


def with_values(recipe: Recipe, values: dict) -> Recipe:
    """The recipe with dotted keys set to `values` (validated; the search section dropped)."""
    data = {**recipe.dump(), "search": None}
    for key, value in values.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {"name": node[part]} if part == "model" and isinstance(node.get(part), str) else {}
            node = node[part]
        node[parts[-1]] = value
    return load(data)


def check_space(recipe: Recipe) -> None:
    """Every key of the space exists and both ends of every range validate: all errors before any trial."""
    errors = []
    for key, p in space(recipe).items():
        for value in (p.choices if p.choices is not None else [p.low, p.high]):
            try:
                with_values(recipe, {key: value})
            except RecipeError as e:
                errors += [f"search.space.{key}={value!r}: {m}" for m in e.errors]
    if errors:
        raise RecipeError("search", list(dict.fromkeys(errors)))


def suggest(trial, key: str, p: Param):
    if p.choices is not None:
        return trial.suggest_categorical(key, p.choices)
    if p.integer:
        return trial.suggest_int(key, p.low, p.high, log=p.log)
    return trial.suggest_float(key, float(p.low), float(p.high), log=p.log)


def best_validation(history: list[dict], metric: str, direction: str) -> float | None:
    """The best checkpoint's score: the best validation value of `metric` in a run's history."""
    values = [r[metric] for r in history if r.get("split") == "validation" and metric in r]
    if not values:
        return None
    return max(values) if direction == "max" else min(values)


class Report(Callback):
    """Reports each validation value to the trial (resource: evaluations so far); stops a pruned trial."""

    def __init__(self, trial, metric: str, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune
        self.evals, self.pruned = 0, False

    def on_log(self, record: dict) -> None:
        if record.get("split") != "validation" or self.metric not in record:
            return
        self.evals += 1
        self.trial.report(record[self.metric], self.evals)
        if self.prune and self.trial.should_prune():
            self.pruned = True
            raise StopTraining(f"pruned by the search after {self.evals} evaluations")


def resumable(folder: Path, name: str | None) -> Path | None:
    """The run folder of an interrupted trial when this process can continue it exactly: it has a committed
    checkpoint, no eval.json, and no lock held by another host (a dead process's lock here is taken over)."""
    from tunesmith import checkpoint
    if not name or not (folder / name / "recipe.yaml").exists() or (folder / name / "eval.json").exists():
        return None
    if checkpoint.newest(folder / name / "checkpoints", log=lambda *a: None) is None:
        return None
    lock = folder / name / LOCK
    try:
        owner = (io.parse_line(lock.read_text()) or {}) if lock.exists() else {}
    except OSError:
        owner = {}
    return folder / name if owner.get("host", socket.gethostname()) == socket.gethostname() else None


def open_study(recipe: Recipe, folder: Path, storage: str | None, name: str):
    optuna = optuna_module()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    cfg = settings(recipe)
    url = storage_url(storage, folder)
    # a server that does not answer: 10 s, not the operating system's minutes (a URL's own connect_timeout wins)
    engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") and \
        "connect_timeout" not in url else None
    try:
        rdb = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat, grace_period=2 * cfg.heartbeat,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry))
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise storage_error(storage, url, e) from None
    pruner = {"hyperband": optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3),
              "halving": optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
              "none": optuna.pruners.NopPruner()}[cfg.pruner]
    direction = "maximize" if recipe.direction == "max" else "minimize"
    return optuna.create_study(study_name=name, storage=rdb, load_if_exists=True, direction=direction,
                               sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner)


def objective(recipe: Recipe, folder: Path, say=print):
    optuna = optuna_module()
    import tunesmith as ts

    cfg, metric = settings(recipe), recipe.train.metric

    def run_trial(trial) -> float:
        values = {key: suggest(trial, key, p) for key, p in space(recipe).items()}
        # a sampled epoch count is what the trial trains: train.min_steps would raise small values silently
        floor = {"train.min_steps": 0} if "train.epochs" in values and "train.min_steps" not in values else {}
        trial_recipe = with_values(recipe, {**values, **floor})
        resume = resumable(folder, trial.user_attrs.get("run_dir"))   # a retry carries its failed trial's attrs
        run_dir = resume or folder / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", run_dir.name)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        say(f"trial {trial.number}: {values}")
        if cfg.cv:
            from tunesmith.selection.cv import cross_validate

            try:
                result = cross_validate(trial_recipe, run_dir, folds=cfg.cv)
            except Interrupted:
                raise KeyboardInterrupt from None
            score = result["metrics"][metric]["mean"]
            trial.set_user_attr("test", score)
            return score
        report = Report(trial, metric, prune=cfg.pruner != "none")
        if resume:                                  # what the failed trial validated before its checkpoint
            from tunesmith import checkpoint

            say(f"trial {trial.number}: continuing {run_dir.name} from its newest checkpoint")
            step = int(checkpoint.newest(run_dir / "checkpoints", log=lambda *a: None).name.split("-")[1])
            for record in ts.Run(run_dir).history:
                if record.get("step", 0) <= step:
                    report.on_log(record)
        try:
            run = ts.train(trial_recipe, run_dir=None if resume else run_dir, resume=resume, callbacks=[report])
        except Interrupted:                         # Ctrl-C / SIGTERM: end the search; the trial runs again
            raise KeyboardInterrupt from None
        score = best_validation(run.history, metric, recipe.direction)
        trial.set_user_attr("test", run.metrics.get(metric))
        if score is None:
            raise TunesmithError(f"{run_dir}: no validation record of {metric}")
        if report.pruned:
            raise optuna.TrialPruned(report.pruned)
        return score

    def said(trial) -> float:                       # a user's mistake in a trial: one line, kept in the study
        try:
            return run_trial(trial)
        except TunesmithError as e:
            say(f"trial {trial.number} failed: {e}")
            trial.set_user_attr("error", str(e)[:QUOTE])
            raise

    return said


def search(recipe, folder: str | Path | None = None, trials: int | None = None, budget: str | None = None,
           storage: str | None = None, study: str | None = None, say=print) -> dict:
    """Run (or resume, or join) a study until `trials` trials are complete or pruned, or `budget` has passed
    (no trial starts after it). recipe: a Recipe, or what ts.load_recipe takes (a YAML path, a dict); trials and
    budget default to the recipe's search section; study: default the recipe's name or task; folder: default
    runs/search-<study>. Returns the summary written to trials.json, with `best` (trial, run, score) once a
    trial completed, and `folder`. Ctrl-C: Interrupted (the trial that was running runs again on resume)."""
    optuna = optuna_module()
    from optuna.trial import TrialState

    recipe = recipe if isinstance(recipe, Recipe) else load(recipe)
    name = study or recipe.name or recipe.task
    folder = Path(folder or Path("runs") / f"search-{name}")
    cfg = settings(recipe)
    trials = trials if trials is not None else (None if budget else cfg.trials)
    budget = budget or cfg.budget
    try:
        deadline = time.monotonic() + seconds(budget) if budget else None
    except ValueError as e:
        raise UsageError(f"budget {budget}: {e}") from None
    if trials is None and deadline is None:
        raise RecipeError("search", ["give search.trials or a budget"])
    if trials is not None and trials < 1:
        raise UsageError(f"trials {trials}: give a whole number >= 1")
    check_space(recipe)
    made = io.first_missing(folder)                # removed again when the study cannot start
    try:
        folder.mkdir(parents=True, exist_ok=True)
        st = open_study(recipe, folder, storage, name)
    except OSError as e:
        raise TunesmithError(f"cannot make the study folder {folder}: {e.strerror or e}; give another --dir") from None
    except TunesmithError:
        if made:                                    # no empty study folder left behind
            shutil.rmtree(made, ignore_errors=True)
        raise
    run_trial = objective(recipe, folder, say)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    failures = 0
    while True:
        optuna.storages.fail_stale_trials(st)          # a dead worker's trial: failed, and a retry queued
        now = st.get_trials(deepcopy=False)
        done = sum(t.state in finished for t in now)
        waiting = sum(t.state == TrialState.WAITING for t in now)
        if deadline is not None and time.monotonic() >= deadline:
            break
        if trials is not None and done >= trials and not waiting:
            if not any(t.state == TrialState.RUNNING for t in now):
                break
            time.sleep(cfg.heartbeat)                  # another worker's trial: wait until it ends or goes stale
            continue
        say(f"search: {done} of {trials or '-'} trials finished in study '{name}'")
        try:
            st.optimize(run_trial, n_trials=1, catch=(TunesmithError,))
        except KeyboardInterrupt:                      # optuna marked the trial failed: queue it again for resume
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            last = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.FAIL][-1:]
            for t in last:
                RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)(st, t)
            raise Interrupted(f"interrupted: the trial that was running will run again; resume with the same "
                              f"command (study folder {folder})", 130) from None
        mine = st.get_trials(deepcopy=False)[-1:]
        failures = failures + 1 if mine and mine[0].state == TrialState.FAIL else 0
        if failures >= 3:
            if made and not any(t.state in finished for t in st.get_trials(deepcopy=False)):
                shutil.rmtree(made, ignore_errors=True)         # nothing in it worth keeping
                where = ""
            else:
                where = f"; see {folder}"
            raise TunesmithError(f"search: 3 trials in a row failed (the last: "
                                 f"{mine[0].user_attrs.get('error', 'see above')}){where}")
    return summarize(st, recipe, folder, say)


def summarize(st, recipe: Recipe, folder: Path, say=print) -> dict:
    from optuna.trial import TrialState

    rows = [{"number": t.number, "state": t.state.name, "score": t.value,
             "test": t.user_attrs.get("test"), "params": t.params, "run_dir": t.user_attrs.get("run_dir"),
             "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
             if t.datetime_complete and t.datetime_start else None}
            for t in st.get_trials(deepcopy=False)]
    complete = [t for t in st.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    out = {"study": st.study_name, "metric": recipe.train.metric, "direction": recipe.direction, "trials": rows}
    if complete:
        best = st.best_trial
        run_dir = folder / best.user_attrs["run_dir"]
        shutil.copyfile(run_dir / "recipe.yaml", folder / "best.yaml")
        out["best"] = {"number": best.number, "score": best.value, "run_dir": str(run_dir),
                       "test": best.user_attrs.get("test"), "params": best.params}
    io.write_json(folder / "trials.json", out, say)
    if say is print:
        show_table(out)
    else:
        say(render(out))
    if complete:
        say(f"best trial {out['best']['number']}: {recipe.train.metric} {out['best']['score']:.4f} "
            f"(validation, best checkpoint); run {out['best']['run_dir']}; recipe {folder / 'best.yaml'}")
    return {**out, "folder": str(folder)}


def trials_table(summary: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of the trials: number, state, scores, seconds and every searched key by its full name."""
    keys = list(dict.fromkeys(k for t in summary["trials"] for k in t["params"]))
    head = ["trial", "state", f"{summary['metric']} (val)", "test", "seconds", *keys]
    rows = [[t["number"], t["state"], t["score"], t["test"], t["seconds"], *[t["params"].get(k) for k in keys]]
            for t in summary["trials"]]
    return head, rows


def render(summary: dict) -> str:
    """The trials as plain text (tunesmith.io.table): full column names, whole values, as wide as it needs."""
    return f"study {summary['study']}\n" + io.table(*trials_table(summary))


def show_table(summary: dict, file=None) -> None:
    """On a terminal wide enough for every column whole, a rich table; otherwise (a pipe, a file, a narrow
    terminal, no rich) the plain text of render(): full column names, never cut to "…"."""
    file = file or sys.stdout
    plain = render(summary)
    if file.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            Console = None
        head, rows = trials_table(summary)
        console = Console(file=file) if Console else None
        # rich draws "│" borders: 3 characters a column and one more, where the plain text has 2 between columns
        if console and max(map(len, plain.splitlines())) + len(head) + 3 <= console.width:
            t = Table(title=f"study {summary['study']}")
            for h in head:
                t.add_column(h, overflow="fold")
            for r in rows:
                t.add_row(*(io.cell(v) for v in r))
            console.print(t)
            return
    print(plain, file=file)
