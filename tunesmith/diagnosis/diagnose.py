"""`ts.doctor(recipe)` and `tunesmith doctor RECIPE`: what is wrong with the data, found before training.

It reads the data exactly as `train` does (tunesmith.splits.load_data) and asks the task only through the
Task protocol (check, check_notes, key, stratify_key, balance_labels, encode, length_stats, embed), so it works
for every task; a check whose hook a task lacks is reported as not available, with the reason. Exit status: 0
clean or warnings only, 1 blocking problems (rows `train` would stop on under data.bad_rows=error, examples that
train as loss 0). `train` runs the row checks itself and, under bad_rows=error, stops with `rejects_report`.

doctor.json (version 1; these keys are stable, later versions only add keys):
  version          1
  recipe           {task, model, train, validation, test, max_length, bad_rows}
  status           "clean" | "warnings" | "blocking"
  blocking         [str] one line per blocking problem (what, how many, what to do)
  warnings         [str] one line per warning
  files            [{file, split, read, usable, rejected, columns}]   read = usable + rejected, per file; a task
                    whose reader rejects parts of rows (Task.part_unit: boxes) adds unit, part and parts {read, usable,
                    rejected, dropped} (tunesmith.splits.counts)
  splits           {split: rows used}     split_from_train: [split] cut from train, stratified by label
  unused_rows      usable train rows left out by data.max_rows
  shots            data.shots's sample: {shots, seed, from, kept, short: {class: rows}}; {} when not sampled
  rejects          [{origin, split, reason}] every unusable row, file order; origin "file:line" or "file#row"
  reject_kinds     {kind: count}, the reasons without their details
  check_notes      [str] what the task's row checks changed in usable rows (Task.check_notes: repaired tags), also
                    in warnings
  duplicates       {available, note?, by_split: {split: {exact_extra, normalised_extra, exact: [group],
                    normalised: [group]}}, conflicting: [group + splits] | null}   group = {text, origins, labels?};
                    *_extra: rows a dedup would drop; conflicting: same normalised input, different labels
                    (null: the task gives no labels)
  leakage          {available, note?, near_method, near_threshold, by_splits: [{splits, exact, normalised, near}],
                    pairs: [{kind, similarity, split_a, origin_a, split_b, origin_b, text_a, text_b}]}
                    kind: exact | normalised (case, whitespace, punctuation) | near; one pair per later-split row
  balance          {available, note?, unit, labels, counts: {split: {label: n}}, train_ratio, warnings, suggestions}
                    unit: what a count counts (Task.balance_unit): "rows", or "entities" (a tagger's entity types)
  lengths          {available, note?, by_split: {split: {examples, limit, p50, p90, p99, max, cut?, cut_share?,
                    tokens_cut?, tokens_cut_share?, trained_tokens?, trained_share?, all_masked?, missing_end?,
                    windowed?}}}     windowed: origins of examples longer than the limit, kept whole as windows
  label_noise      {available, note?, method, checked, skipped_rare, oof_accuracy,
                    candidates: [{origin, split, label, suggested, label_probability, text}]}  most suspicious first
  task             the task's own checks (Task.data_findings), where it has any: text2text {sources, targets,
                    identical, conflicting}
  task_lines       [str] the task section as the terminal shows it (Task.findings_lines), where the task gives any
  seconds          {read, model, lengths, embed, leakage, label_noise, total}
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tunesmith import io
from tunesmith.diagnosis.checks import (
    balance,
    conflicts,
    duplicates,
    excerpt,
    leakage,
    lengths,
    near_text,
    near_vectors,
    reason_kind,
)

NOT_AVAILABLE = "not available for this task"


def diagnose(recipe) -> dict:
    """Every check on the recipe's data; the doctor.json dict (see the module docstring)."""
    import numpy as np
    import torch

    from tunesmith.device import autocast, choose_device, choose_precision
    from tunesmith.splits import load_data, part_totals
    from tunesmith.tasks import get_task

    cfg, seconds, t0 = recipe.doctor, {}, time.perf_counter()
    lap = [t0]

    def clock(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - lap[0], 2)
        lap[0] = now

    task = get_task(recipe)
    loaded = load_data(task, recipe)
    tables = loaded.tables
    origins = {s: t.origins for s, t in tables.items()}
    report = {"version": 1, "recipe": {"task": recipe.task, "model": recipe.model.name, "train": recipe.data.train,
                                       "validation": recipe.data.validation, "test": recipe.data.test,
                                       "max_length": task.max_length, "bad_rows": recipe.data.bad_rows},
              "status": "clean", "blocking": [], "warnings": []}
    blocking, warnings = report["blocking"], report["warnings"]
    report |= {"files": loaded.files, "splits": {s: len(t) for s, t in tables.items()},
               "split_from_train": [s for s in ("validation", "test") if not getattr(recipe.data, s)],
               "unused_rows": loaded.unused, "shots": loaded.sampled, "rejects": [r.as_dict() for r in loaded.rejects],
               "reject_kinds": dict(Counter(reason_kind(r.reason) for r in loaded.rejects).most_common())}
    warnings += [line.removeprefix("warning: ") for line in loaded.shot_lines()[1:]]   # data.shots: short classes
    if loaded.rejects:
        n, parts = f"{len(loaded.rejects):,} unusable row(s)", part_totals(task, loaded.files)
        if parts:                                   # Task.part_unit: rejected boxes are not rejected images
            n = " and ".join(f"{k:,} unusable {unit}" for k, unit in ((parts["rejected"], parts["unit"]),
                             (parts["parts"]["rejected"], parts["part"])) if k)
        if recipe.data.bad_rows == "error":
            blocking.append(f"{n}: train stops on them; fix them or set data.bad_rows=skip")
        else:
            warnings.append(f"{n}: train skips them and lists each in the run's rejects.jsonl")
    report["check_notes"] = task.check_notes()
    warnings.extend(report["check_notes"])
    blocking.extend(f"{s}: no usable rows; train cannot evaluate on it" for s, t in tables.items() if not len(t))
    clock("read")

    keys = _keys(task, tables)
    labels = {s: [task.stratify_key(r) for r in t.rows] for s, t in tables.items()}
    labels = labels if any(v is not None for v in labels["train"]) else None
    report["duplicates"] = _duplicates(keys, labels, origins, warnings)
    classes = {s: [c for r in t.rows for c in task.balance_labels(r)] for s, t in tables.items()}
    if not classes["train"]:
        report["balance"] = {"available": False, "note": f"{NOT_AVAILABLE}: Task.balance_labels gives no classes"}
    else:
        report["balance"] = balance(classes, cfg.imbalance_ratio, task.class_weights,
                                    set(report["split_from_train"]), task.balance_unit)
        warnings.extend(report["balance"]["warnings"])

    features = {s: task.encode(t.rows) if len(t) else [] for s, t in tables.items()}   # the processor alone
    one_to_one = all(len(features[s]) == len(t) for s, t in tables.items())
    report["lengths"] = _lengths(task, tables, features, task.max_length, blocking, warnings)
    own, more_warnings, more_blocking = task.data_findings(tables)            # the task's own checks
    if own:
        report["task"] = own
        report |= {"task_lines": lines} if (lines := task.findings_lines(own, cfg.listed)) else {}
    warnings.extend(more_warnings)
    blocking.extend(more_blocking)
    clock("lengths")

    method = cfg.near_method if cfg.near_method != "auto" else (task.near_method if keys is not None else "embedding")
    vectors, embed_note = None, None
    if one_to_one and ((cfg.label_noise and labels is not None) or method == "embedding"):
        device = choose_device()                    # weights only for the checks that need embeddings
        model = task.load_model().to(device).eval()
        clock("model")
        mixed = choose_precision(recipe.train.precision, device)[0]         # bf16 only where native
        try:
            with torch.no_grad(), autocast(device, mixed):
                vectors = {s: task.embed(model, features[s], recipe.eval.batch_size) for s in tables if features[s]}
            width = next(iter(vectors.values())).shape[1]
            vectors = {s: vectors.get(s, np.zeros((0, width), np.float32)) for s in tables}   # empty splits
        except (NotImplementedError, TypeError, AttributeError, KeyError, ValueError, RuntimeError) as e:
            embed_note = f"{NOT_AVAILABLE}: Task.embed failed ({type(e).__name__}: {e})"
    elif not one_to_one:
        embed_note = f"{NOT_AVAILABLE}: Task.encode does not give one feature per row"
    clock("embed")
    report["leakage"] = _leakage(keys, vectors, origins, method, cfg.near_threshold, embed_note, warnings)
    clock("leakage")
    report["label_noise"] = _label_noise(cfg, recipe, labels, vectors, embed_note, tables, keys, warnings)
    clock("label_noise")
    seconds["total"] = round(time.perf_counter() - t0, 2)
    report["seconds"] = seconds
    report["status"] = "blocking" if blocking else "warnings" if warnings else "clean"
    return report


def _keys(task, tables) -> dict[str, list[str]] | None:
    try:
        return {s: [str(task.key(r)) for r in t.rows] for s, t in tables.items()}
    except NotImplementedError:
        return None


def _duplicates(keys, labels, origins, warnings) -> dict:
    if keys is None:
        return {"available": False, "note": f"{NOT_AVAILABLE}: Task.key is not implemented"}
    out = {}
    for split in keys:
        d = out[split] = duplicates(keys[split], labels[split] if labels else None, origins[split])
        if d["exact_extra"] or d["normalised_extra"]:
            warnings.append(f"{split}: {d['exact_extra']:,} exact duplicate row(s) in {len(d['exact']):,} group(s), "
                            f"{d['normalised_extra']:,} more up to case/whitespace/punctuation; deduplicate the data")
    conflicting = conflicts(keys, labels, origins) if labels else None
    if conflicting:
        rows = sum(len(g["origins"]) for g in conflicting)
        warnings.append(f"{len(conflicting):,} input(s) appear with different labels ({rows:,} rows, "
                        f"normalised comparison over all splits): fix or drop them")
    return {"available": True, "by_split": out, "conflicting": conflicting}


def _lengths(task, tables, features, limit, blocking, warnings) -> dict:
    out = {}
    for split, table in tables.items():
        if not len(table):
            continue
        stats = task.length_stats(table.rows, features[split])
        if not stats:
            return {"available": False, "note": f"{NOT_AVAILABLE}: Task.length_stats reports nothing"}
        if any(len(stats[k]) != len(table) for k in ("kept", "lengths", "trained") if k in stats):
            raise ValueError(f"Task.length_stats must give one entry per row ({len(table)} in {split})")
        s = out[split] = lengths(stats, limit, table.origins)
        if s.get("cut_share", 0) >= 0.01:                       # fewer is in the table, not a warning
            warnings.append(f"{split}: {s['cut']:,} of {s['examples']:,} examples ({s['cut_share']:.1%}) cut at "
                            f"data.max_length={limit}, {s['tokens_cut_share']:.1%} of tokens lost (p99 = {s['p99']})")
        if s.get("all_masked"):
            blocking.append(f"{split}: {len(s['all_masked']):,} example(s) have every label masked (they train as "
                            f"loss 0), e.g. {s['all_masked'][0]}; shorten the prompt or raise data.max_length")
        if s.get("missing_end"):
            warnings.append(f"{split}: {len(s['missing_end']):,} example(s) lack the end-of-turn token in their "
                            f"trained tokens (the model will not learn to stop), e.g. {s['missing_end'][0]}")
    return {"available": True, "by_split": out}


def _leakage(keys, vectors, origins, method, threshold, embed_note, warnings) -> dict:
    if keys is None and vectors is None:
        return {"available": False, "note": embed_note or f"{NOT_AVAILABLE}: neither Task.key nor Task.embed"}
    threshold = threshold or (0.8 if method == "text" else 0.95)
    near, note = None, None
    if method == "text" and keys is not None:
        def near(a, b):
            return near_text(keys[a], keys[b], threshold)
    elif method == "embedding" and vectors is not None:
        def near(a, b):
            return near_vectors(vectors[a], vectors[b], threshold)
    else:
        note = f"near duplicates {NOT_AVAILABLE} by {method}: " + (embed_note or "Task.key is not implemented")
    out = {"available": True, "near_method": method, "near_threshold": threshold, **({"note": note} if note else {})}
    out |= leakage(keys, origins, near)
    for s in out["by_splits"]:
        total = s["exact"] + s["normalised"] + s["near"]
        if total:
            a, b = s["splits"]
            warnings.append(f"{b}: {total:,} row(s) also in {a} ({s['exact']:,} exact, {s['normalised']:,} "
                            f"normalised, {s['near']:,} near): {b} scores are inflated; deduplicate before splitting")
    return out


def _label_noise(cfg, recipe, labels, vectors, embed_note, tables, keys, warnings) -> dict:
    from tunesmith.diagnosis.noise import label_noise

    if not cfg.label_noise:
        return {"available": False, "note": "off (doctor.label_noise: false)"}
    if labels is None:
        return {"available": False, "note": f"{NOT_AVAILABLE}: Task.stratify_key gives no labels"}
    if vectors is None:
        return {"available": False, "note": embed_note}
    import numpy as np

    where = [(s, i) for s, t in tables.items() for i in range(len(t))]
    found = label_noise(np.concatenate([vectors[s] for s in tables]), [labels[s][i] for s, i in where],
                        cfg.folds, recipe.train.seed)
    method = (f"{cfg.folds}-fold logistic regression on {recipe.model.name} embeddings (Task.embed), "
              f"confident learning (cleanlab), ranked by self-confidence")
    candidates = []
    for c in found.pop("candidates"):
        split, i = where[c["index"]]
        candidates.append({"origin": tables[split].origins[i], "split": split, "label": c["label"],
                           "suggested": c["suggested"], "label_probability": c["label_probability"],
                           "text": excerpt(keys[split][i]) if keys else None})
    if candidates:
        warnings.append(f"{len(candidates):,} label-noise candidate(s): the cross-validated model confidently "
                        f"contradicts their label; review the top of the list")
    return {"available": True, "method": method, **found, "candidates": candidates}


# --- output -----------------------------------------------------------------------------------------

def doctor(recipe, out: str | Path | None = "doctor.json") -> dict:
    """Every check on a recipe's data (a Recipe, or what ts.load_recipe takes: a YAML path or a dict); the
    doctor.json dict, also written to `out` (None: not written). report["blocking"] non-empty: train would stop
    or learn nothing from some rows."""
    from tunesmith.recipe import Recipe, load

    report = diagnose(recipe if isinstance(recipe, Recipe) else load(recipe))
    if out is not None:
        write(report, out)
    return report


def write(report: dict, path: str | Path) -> Path:
    """doctor.json, atomically; the texts as they are (ensure_ascii off), NaN as null."""
    text = io.dumps(report, print, Path(path).name, indent=2, ensure_ascii=False, default=str)
    return io.atomic_write(path, text + "\n")
