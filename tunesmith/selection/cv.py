"""`ts.cross_validate(recipe)` and `tunesmith cv`: K-fold cross-validation; each fold is a run folder.

A cv folder (default runs/cv-<recipe name or task>):
  recipe.yaml       the recipe cross-validated (search section dropped)
  folds/NAME/       each fold's rows: train.jsonl (the fold's train side; its validation split is cut from it for
                    checkpoint choice) and test.jsonl (the held-out fold)
  NAME/             the fold's run folder (eval.json: its held-out fold, best checkpoint)
  oof.jsonl         out-of-fold predictions: every row once per repeat, with repeat, fold, row index and label
  cv.json           per metric: values per fold, mean, standard deviation and a 95% t interval of the mean
All usable rows of every split the recipe names are pooled, then split stratified by label (StratifiedKFold),
or with data.group_column by group as well (StratifiedGroupKFold: a group never sits on both sides).
Re-running skips folds whose run finished. `paired(a, b)` compares two cv folders fold by fold.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import yaml

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.recipe import Recipe, load


def assignments(recipe: Recipe, rows: list[dict], keys: list, folds: int, repeats: int) -> list[tuple[str, list, list]]:
    """(name, train indices, test indices) per fold and repeat; a pure function of rows, seed and group."""
    import numpy as np
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    group_col = recipe.data.group_column
    y = None if keys[0] is None else np.array([str(k) for k in keys])
    groups = None
    if group_col:
        missing = [i for i, r in enumerate(rows) if r.get(group_col) in (None, "")]
        if missing:
            raise TunesmithError(f"data.group_column '{group_col}': {len(missing)} row(s) have no value "
                                 f"(first: row {missing[0] + 1})")
        groups = np.array([str(r[group_col]) for r in rows])
    if groups is not None and len(set(groups)) < folds:
        raise TunesmithError(f"--folds {folds}: data.group_column '{group_col}' has only {len(set(groups))} "
                             f"group(s); give --folds {len(set(groups))} or fewer")
    if y is not None and groups is None:
        label, count = min(collections.Counter(y.tolist()).items(), key=lambda kv: (kv[1], kv[0]))
        if count < folds:
            fewer = f"give --folds {count} or fewer, or more rows of it" if count >= 2 else "give it more rows"
            raise TunesmithError(f"--folds {folds} is more than the {count} row(s) of the smallest class "
                                 f"('{label[:100]}'): every fold's test side needs one; {fewer}")
    if len(rows) < folds:
        raise TunesmithError(f"--folds {folds} is more than the {len(rows)} row(s) of data")
    out = []
    for rep in range(repeats):
        seed = recipe.train.seed + rep
        if groups is not None:
            splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
            labels = y if y is not None else np.zeros(len(rows))
            parts = splitter.split(np.zeros(len(rows)), labels, groups)
        elif y is not None:
            parts = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(rows)), y)
        else:
            parts = KFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(rows)))
        for f, (tr, te) in enumerate(parts):
            name = f"fold-{f + 1}" if repeats == 1 else f"repeat-{rep + 1}-fold-{f + 1}"
            out.append((name, tr.tolist(), te.tolist()))
    return out


def fold_recipe(base: dict, data_dir: Path) -> Recipe:
    """The recipe (dumped, search dropped) on one fold's files: data_dir/train.jsonl (its validation split is cut
    from it) and data_dir/test.jsonl, all rows, no caps."""
    return load({**base, "data": {**base["data"], "train": str(data_dir / "train.jsonl"),
                                  "test": str(data_dir / "test.jsonl"), "validation": None,
                                  "max_rows": None, "max_eval_rows": None}})


def interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95% t interval of the mean (folds taken as independent)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "values": values}


def default_folder(recipe: Recipe) -> Path:
    return Path("runs") / f"cv-{recipe.name or recipe.task}"


def cross_validate(recipe, folder: str | Path | None = None, folds: int = 5, repeats: int = 1, callbacks: list = (),
                   say=print, pool: tuple[str, ...] = ("train", "validation", "test"),
                   predictions: bool = True, until: float | None = None) -> dict:
    """Train one run per fold (and repeat); write cv.json and oof.jsonl; return cv.json's content and `folder`.
    recipe: a Recipe, or what ts.load_recipe takes (a YAML path, a dict). folder: default runs/cv-<name>.
    pool: the splits whose rows are pooled and cut into folds (tune keeps the test split out: train and
    validation); predictions: False skips oof.jsonl (tune scores candidates by the folds' metrics alone);
    until: a time.monotonic() after which no further fold starts (tune's budget; cv.json has the folds run)."""
    import tunesmith as ts
    from tunesmith.splits import load_data
    from tunesmith.tasks import get_task

    if folds < 2 or repeats < 1:
        raise TunesmithError("cv needs --folds >= 2 and --repeats >= 1")
    recipe = recipe if isinstance(recipe, Recipe) else load(recipe)
    folder = Path(folder or default_folder(recipe))
    task = get_task(recipe)
    task.setup()
    loaded = load_data(task, recipe)
    rows = [r for split in pool for r in loaded.tables[split].rows]
    keys = [task.stratify_key(r) for r in rows]
    plan = assignments(recipe, rows, keys, folds, repeats)
    base = {**recipe.dump(), "search": None}
    folder.mkdir(parents=True, exist_ok=True)
    io.atomic_write(folder / "recipe.yaml", yaml.safe_dump(base, sort_keys=False))
    digest = hashlib.sha256(json.dumps([[n, te] for n, _, te in plan]).encode()).hexdigest()[:16]
    results, oof = {}, []
    for name, tr, te in plan:
        if until is not None and results and time.monotonic() >= until:
            say(f"cv: time is up; {len(results)} of {len(plan)} folds run")
            break
        data_dir, run_dir = folder / "folds" / name, folder / name
        if not (run_dir / "eval.json").exists():
            for split, idx in (("train", tr), ("test", te)):
                io.write_jsonl(data_dir / f"{split}.jsonl", [rows[i] for i in idx])
            fold = fold_recipe(base, data_dir)
            say(f"cv: {name} ({len(tr)} train rows, {len(te)} held out)")
            if run_dir.exists():                        # an interrupted fold: start it again
                shutil.rmtree(run_dir)
            ts.train(fold, run_dir=run_dir, callbacks=callbacks)
        results[name] = ts.Run(run_dir).metrics
        if not predictions:
            continue
        predictor = ts.Run(run_dir).load()
        for i, p in zip(te, predictor.predict([rows[i] for i in te])):
            oof.append({"fold": name, "row": i, "target": keys[i], **p})
    metrics = [k for k, v in results[plan[0][0]].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {"folds": folds, "repeats": repeats, "rows": len(rows), "assignment": digest,
           "group_column": recipe.data.group_column, "runs": list(results),
           "metrics": {m: interval([float(results[n][m]) for n in results]) for m in metrics},
           "test_fraction": sum(len(te) for n, _, te in plan if n in results) / (len(results) * len(rows))}
    if predictions:
        io.write_jsonl(folder / "oof.jsonl", oof, say)
    io.write_json(folder / "cv.json", out, say)
    for m in list(type(recipe).metrics)[:4]:
        if m in out["metrics"]:
            s = out["metrics"][m]
            say(f"{m:<12} {s['mean']:.4f} +- {s['std']:.4f} (95% interval {s['low']:.4f} .. {s['high']:.4f})")
    return {**out, "folder": str(folder)}


def paired(a: dict, b: dict) -> dict:
    """Fold-by-fold comparison of two cv.json results over the same folds: per metric the mean difference
    (a - b) and the p-value of the corrected resampled t-test (Nadeau & Bengio 2003: the variance of the
    differences is inflated by test/train, since folds share training rows)."""
    from scipy import stats

    if a["assignment"] != b["assignment"]:
        raise TunesmithError("the two cv folders used different folds (data, seed, folds or group_column "
                             "differ): a paired test needs the same folds")
    out = {}
    frac = a["test_fraction"]
    for m in a["metrics"]:
        if m not in b["metrics"]:
            continue
        d = [x - y for x, y in zip(a["metrics"][m]["values"], b["metrics"][m]["values"])]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        se = math.sqrt((1 / n + frac / (1 - frac)) * var)
        p = 1.0 if se == 0 and mean == 0 else 0.0 if se == 0 else float(2 * stats.t.sf(abs(mean / se), n - 1))
        out[m] = {"difference": mean, "p": p, "folds": n}
    return out
