"""`ts.compare(folders)` and `tunesmith compare`: finished runs side by side, or cv folders with a paired test.

compare() returns a dict that render() turns into terminal text (tunesmith.io.table):
  kind      "runs": run folders (eval.json), or "cv": cv folders (cv.json, tunesmith.selection.cv)
  columns   [{name, path}] one per folder, in the order given; runs add model (name, " (scratch)" when not
            pretrained)
  metrics   {metric: [value per folder, None where a folder lacks it]}: runs, every scalar of eval.json and
            train_seconds; cv, the mean over folds
  paired    cv with exactly two folders: {metric: {difference (a - b), p, folds}} (cv.paired: the corrected
            resampled t-test over the same folds; folders cut into other folds raise TunesmithError)
"""
from __future__ import annotations

from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError


def compare(folders: list[str | Path]) -> dict:
    """The metrics of several finished runs, or of several cv folders (two: with a paired test over folds)."""
    paths = [Path(p) for p in folders]
    if not paths:
        raise TunesmithError("compare needs at least one run folder or cv folder")
    is_cv = [(p / "cv.json").exists() for p in paths]
    if all(is_cv):
        return _cv(paths)
    if any(is_cv):
        raise TunesmithError("compare takes finished run folders or cv folders, not both: "
                             + ", ".join(str(p) for p, c in zip(paths, is_cv) if c) + " are cv folders")
    return _runs(paths)


def _runs(paths: list[Path]) -> dict:
    from tunesmith.run import Run

    columns, results = [], []
    for path in paths:
        run = Run(path)
        if not run.metrics:
            raise TunesmithError(f"{run.path}: no eval.json (not a finished run)")
        recipe, result = run.recipe, run.metrics
        summary = [r for r in run.history if r.get("summary")]
        if summary and "train_seconds" in summary[-1]:
            result = {**result, "train_seconds": summary[-1]["train_seconds"]}
        columns.append({"name": run.path.name, "path": str(run.path),
                        "model": f"{recipe.model.name}{'' if recipe.model.pretrained else ' (scratch)'}"})
        results.append(result)
    keys = dict.fromkeys(k for r in results for k, v in r.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool))
    return {"kind": "runs", "columns": columns, "metrics": {k: [r.get(k) for r in results] for k in keys}}


def _cv(paths: list[Path]) -> dict:
    from tunesmith.selection.cv import paired

    results = [io.read_json(p / "cv.json") for p in paths]
    keys = dict.fromkeys(m for r in results for m in r["metrics"])
    out = {"kind": "cv", "columns": [{"name": p.name, "path": str(p)} for p in paths],
           "metrics": {m: [r["metrics"][m]["mean"] if m in r["metrics"] else None for r in results] for m in keys}}
    if len(results) == 2:
        out["paired"] = paired(*results)
    return out


def render(comparison: dict) -> str:
    """The comparison as plain-text tables: one column per folder (its folder name), one row per metric."""
    columns = comparison["columns"]
    names = [c["name"] for c in columns]
    lines = []
    if comparison["kind"] == "runs":
        lines += [io.table(["run", "model"], [[c["name"], c["model"]] for c in columns]), ""]
    paired = comparison.get("paired")
    if not paired:
        rows = [[m, *values] for m, values in comparison["metrics"].items()]
        return "\n".join(lines + [io.table(["metric", *names], rows)])
    rows = [[m, *comparison["metrics"][m], t["difference"], t["p"], "*" if t["p"] < 0.05 else ""]
            for m, t in paired.items()]
    folds = next(iter(paired.values()))["folds"]
    return "\n".join([io.table(["metric", *names, "a - b", "p (paired)", ""], rows),
                      f"{folds} folds; a = {names[0]}, b = {names[1]}; * : differs beyond fold noise (corrected "
                      f"resampled t-test, p < 0.05)"])
