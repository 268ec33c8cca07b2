"""`write_report(run_dirs, out)`: one self-contained HTML page about one or several run folders.

Apart from the explanations section it only reads files in the run folders (recipe.yaml, metrics.jsonl,
eval.json, checkpoints/best/state.json, and when present predictions.jsonl, samples.jsonl, misclassified.jsonl,
pr_curves.json, doctor.json; a boxes run's sample images, by the path samples.jsonl gives) and what each run's
task declares (Task.prediction, Task.explainable: the task's class is imported, no model is loaded), so it works on
a laptop that holds nothing but copied run folders. Plots are matplotlib PNGs (Agg
backend) embedded as base64 data URIs; there is no script and no external URL, so the page opens offline.

Sections (every one is always present, with a note where it does not apply, so tools can find them by id):
  overview        runs, task, what it predicts, model, steps, time, best checkpoint, the test metrics side by side
  curves          train/validation loss, the validation selection metric, learning rate, samples/s;
                  one colour per run, the best checkpoint's step marked (dashed line, star)
  confusion       confusion matrix heatmap per run (rows: true label, columns: predicted)       label runs
  per-class       precision / recall / F1 / support per label (label runs), per entity type (spans runs);
                  AP@[.5:.95] and AP@.5 per class (boxes runs)
  reliability     reliability diagram + ECE from per-example probabilities (eval.json          label runs
                  "predictions" or predictions.jsonl: one {"label", "probabilities": {name: p}} per test row)
  pr-curves       precision against recall per class at IoU .5 and .5:.95 (pr_curves.json)          boxes runs
  before-after    eval.json `before` against the fine-tuned metrics
  slices          per-slice metrics (eval.slices), gaps, parity differences; the largest gap flagged   label runs
  explanations    token attributions / saliency for the most confident mistakes (tunesmith/insight/explain.py: loads
                  the model, so this section alone needs torch and captum; write_report(explain=False) skips it)
  doctor          doctor.json status, blocking problems, warnings
  samples         test examples as the run's prediction kind draws them (samples.jsonl): text, spans, boxes (the
                  image with true and predicted boxes drawn);
                  spans runs also list their misclassified sentences (misclassified.jsonl)
  recipe-diff     recipe keys whose values differ between the runs
Which sections a prediction kind fills is the table in tunesmith/insight/kinds.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.insight import kinds
from tunesmith.insight.page import COLORS, CSS, e, note, per_run, png, run_label, scalar, section, table

STATE_KEYS = {"step", "rng", "scheduler", "optimizer", "epoch"}   # non-metric keys of checkpoints/best/state.json


# ---------------------------------------------------------------- reading run folders

def declarations(task: str | None) -> dict:
    """What the run's task declares ({"prediction", "explainable"}), or {} when no known task has that name (a
    task registered in another process: register it here too)."""
    from tunesmith.tasks import recipe_classes, task_class

    recipe_cls = recipe_classes().get(task)
    if recipe_cls is None:
        return {}
    cls = task_class(recipe_cls.model_construct())        # the Task class: declarations are class attributes
    return {"prediction": cls.prediction, "explainable": cls.explainable}


def load_run(path: str | Path) -> dict:
    """Everything the report shows about one run folder, read from disk only."""
    p = Path(path)
    if not (p / "recipe.yaml").exists() and not (p / "metrics.jsonl").exists():
        raise TunesmithError(f"{p} is not a run folder (no recipe.yaml or metrics.jsonl)")
    recipe = yaml.safe_load((p / "recipe.yaml").read_text()) if (p / "recipe.yaml").exists() else {}
    ev = io.read_json(p / "eval.json") or {}
    state = io.read_json(p / "checkpoints" / "best" / "state.json") or {}
    preds = ev.get("predictions") or io.read_jsonl(p / "predictions.jsonl") or None
    run = {"path": p, "name": p.name, "recipe": recipe or {}, "records": io.read_jsonl(p / "metrics.jsonl"),
           "eval": ev, "state": state, "predictions": preds, "samples": io.read_jsonl(p / "samples.jsonl"),
           "misclassified": io.read_jsonl(p / "misclassified.jsonl"), "pr_curves": io.read_json(p / "pr_curves.json"),
           "doctor": io.read_json(p / "doctor.json"), **declarations((recipe or {}).get("task"))}
    run["metric"] = _selection_metric(run)
    run["best_step"] = state.get("step")
    return run


def _selection_metric(run: dict) -> str | None:
    """train.metric from the recipe, else the metric saved with the best checkpoint, else a usual one."""
    chosen = ((run["recipe"].get("train") or {}).get("metric"))
    if chosen:
        return chosen
    saved = [k for k in run["state"] if k not in STATE_KEYS and isinstance(run["state"][k], (int, float))]
    if saved:
        return saved[0]
    val = [r for r in run["records"] if r.get("split") == "validation"]
    for key in ("accuracy", "f1_macro", "exact_match", "loss"):
        if any(key in r for r in val):
            return key
    return None


# ---------------------------------------------------------------- sections

def _overview(runs: list[dict]) -> str:
    rows = []
    for i, r in enumerate(runs):
        summ = next((x for x in reversed(r["records"]) if x.get("summary")), {})
        steps = max((x.get("step", 0) for x in r["records"]), default=0)
        best = r["state"].get(r["metric"]) if r["metric"] else None
        rows.append([run_label(i, r), e(r["recipe"].get("task", "?")), e(r.get("prediction") or "?"),
                     e((r["recipe"].get("model") or {}).get("name", r["recipe"].get("model", "?"))),
                     steps, summ.get("train_seconds"), e(r["metric"]), r["best_step"], best])
    out = table(["run", "task", "predicts", "model", "steps", "train seconds", "selection metric", "best step",
                 "best value"], rows, left=4)
    for r in runs:                              # why training stopped, what the validation curve saw (loop.py)
        summ = next((x for x in reversed(r["records"]) if x.get("summary")), {})
        said = [x for x in (summ.get("ended"), (summ.get("curve") or {}).get("line")) if x]
        if said:
            out += note(f"{r['name']}: " + "; ".join(said))
    keys = []                                   # scalar test metrics, in first-seen order across the runs
    for r in runs:
        keys += [k for k, v in r["eval"].items() if scalar(v) and k not in keys]
    if keys:
        out += "<h3>Test metrics (eval.json)</h3>" + table(
            ["metric"] + [r["name"] for r in runs], [[e(k)] + [r["eval"].get(k) for r in runs] for k in keys])
    else:
        out += note("no eval.json: the run did not finish")
    for r in runs:
        out += (f"<details><summary>recipe.yaml of {e(r['name'])}</summary>"
                f"<pre>{e(yaml.safe_dump(r['recipe'], sort_keys=False))}</pre></details>")
    return out


def _curves(runs: list[dict]) -> str:
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend
    if not any(r["records"] for r in runs):
        return note("no metrics.jsonl records")
    fig = Figure(figsize=(12, 7.5))
    axes = fig.subplots(2, 2)
    (ax_loss, ax_metric), (ax_lr, ax_speed) = axes
    metrics = sorted({r["metric"] for r in runs if r["metric"]})
    for i, r in enumerate(runs):
        c = COLORS[i % len(COLORS)]
        train = [x for x in r["records"] if "split" not in x and not x.get("summary")]
        val = [x for x in r["records"] if x.get("split") == "validation"]
        series = lambda rows, key: ([x["step"] for x in rows if scalar(x.get(key))],
                                    [x[key] for x in rows if scalar(x.get(key))])
        tag = f"{r['name']} " if len(runs) > 1 else ""
        ax_loss.plot(*series(train, "loss"), color=c, lw=1, alpha=.8, label=f"{tag}train")
        ax_loss.plot(*series(val, "loss"), color=c, ls="--", marker="o", ms=4, label=f"{tag}validation")
        if r["metric"]:
            xs, ys = series(val, r["metric"])
            ax_metric.plot(xs, ys, color=c, marker="o", ms=4, label=f"{tag}{r['metric']}")
            if r["best_step"] in xs:
                ax_metric.plot([r["best_step"]], [ys[xs.index(r["best_step"])]], "*", color=c, ms=16, mec="k")
        ax_lr.plot(*series(train, "lr"), color=c, label=tag or "lr")
        ax_speed.plot(*series(train, "samples_per_s"), color=c, lw=1, label=f"{tag}samples/s")
        if r["best_step"] is not None:
            for ax in axes.flat:
                ax.axvline(r["best_step"], color=c, ls=":", lw=1.5,
                           label=f"{tag}best step {r['best_step']}" if ax is ax_metric else None)
    metric_title = f"validation {' / '.join(metrics) or 'metric'} (best checkpoint: star)"
    titles = ["loss (train: line, validation: dashed)", metric_title, "learning rate", "throughput (samples/s)"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def _before_after(run: dict) -> str:
    before = run["eval"].get("before")
    if not before:
        return note("no `before` in eval.json (eval.before was off)")
    keys = [k for k, v in run["eval"].items() if scalar(v) and scalar(before.get(k))]
    rows = [[e(k), before[k], run["eval"][k], run["eval"][k] - before[k]] for k in keys]
    return table(["metric", "before fine-tuning", "after", "change"], rows)


def _explanations(run: dict) -> str:
    from tunesmith.insight import explain

    if not run.get("explained"):
        return note(run.get("explain_note") or "explanations not computed (--no-explain)")
    return explain.render(run["explained"])


def explain_runs(runs: list[dict]) -> None:
    """Each run's most confident mistakes, explained (needs its model/, torch and captum); else a note why not."""
    from tunesmith.insight import explain

    for r in runs:
        if not r.get("explainable"):
            r["explain_note"] = f"task '{r['recipe'].get('task', '?')}' declares no explanations (Task.explainable)"
            continue
        if not (r["path"] / "model").is_dir() or not (r["path"] / "predictions.jsonl").exists():
            r["explain_note"] = "no model/ or predictions.jsonl in the run folder (a classification run writes both)"
            continue
        try:
            r["explained"] = explain.explain(r["path"])
        except TunesmithError as err:       # no captum, a model that cannot be loaded here
            r["explain_note"] = f"no explanations: {err}"


def _doctor(run: dict) -> str:
    d = run["doctor"]
    if not d:
        return note("no doctor.json in the run folder (run `tunesmith doctor RECIPE --out RUN/doctor.json`)")
    status = str(d.get("status", "?"))
    out = f'<p>status: <span class="{e(status)}">{e(status)}</span></p>'
    for key in ("blocking", "warnings"):
        items = d.get(key) or []
        out += f"<h4>{key} ({len(items)})</h4>" + (
            "<ul>" + "".join(f"<li>{e(x)}</li>" for x in items) + "</ul>" if items else note("none"))
    return out


def flatten(d, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists stay values."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def recipe_diff(runs: list[dict]) -> list[tuple[str, list]]:
    """(dotted key, [value per run]) for the recipe keys whose values differ (a missing key counts)."""
    flat = [flatten(r["recipe"]) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    missing = object()
    return [(k, [f.get(k, missing) for f in flat]) for k in keys
            if len({json.dumps(f.get(k, "<missing>"), sort_keys=True, default=str) for f in flat}) > 1]


def _recipe_diff(runs: list[dict]) -> str:
    if len(runs) < 2:
        return note("one run: nothing to compare (give several run folders to see the recipe keys that differ)")
    diff = recipe_diff(runs)
    if not diff:
        return note("the recipes are identical")
    show = lambda v: "<i>missing</i>" if not isinstance(v, (str, int, float, bool, list, type(None))) else e(v)
    rows = "".join(f'<tr><td class="l">{e(k)}</td>' + "".join(f'<td class="l">{show(v)}</td>' for v in vals)
                   + "</tr>" for k, vals in diff)
    head = "".join(f'<th class="l">{run_label(i, r)}</th>' for i, r in enumerate(runs))
    return f'<table><tr><th class="l">recipe key</th>{head}</tr>{rows}</table>'


# ---------------------------------------------------------------- the page

SECTIONS = [("overview", "Overview"), ("curves", "Training and validation curves"),
            ("confusion", "Confusion matrix"), ("per-class", "Per-class precision / recall / F1"),
            ("reliability", "Reliability diagram (calibration)"), ("pr-curves", "Precision-recall curves"),
            ("before-after", "Before and after fine-tuning"),
            ("slices", "Slices (fairness)"), ("explanations", "Why the model decided (explanations)"),
            ("doctor", "Data doctor"), ("samples", "Sample predictions"), ("recipe-diff", "Recipe differences")]
ALL_RUNS = {"overview": _overview, "curves": _curves, "recipe-diff": _recipe_diff}      # one block for every run
PER_RUN = {"before-after": _before_after, "explanations": _explanations, "doctor": _doctor}


def render(runs: list[dict]) -> str:
    """The page: each section once for all runs, or one block per run (by the run's prediction kind where
    tunesmith/insight/kinds.py says so)."""
    title = "tunesmith report: " + ", ".join(r["name"] for r in runs)
    parts = []
    for sid, heading in SECTIONS:
        if sid in ALL_RUNS:
            body = ALL_RUNS[sid](runs)
        else:
            body = per_run(runs, sid, PER_RUN.get(sid) or (lambda run, sid=sid: kinds.draw(run, sid)))
        parts.append(section(sid, heading, body))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>{e(title)}</h1>\n" + "".join(parts) + "</body></html>\n")


def write_report(run_dirs: list[Path], out: Path = Path("report.html"), explain: bool = True) -> Path:
    """Render one self-contained HTML report of `run_dirs` (one or several run folders) to `out`; return it.
    explain: add each run's most confident mistakes, explained (loads its model)."""
    try:
        import matplotlib  # noqa: F401   figures are built without pyplot, so no backend is switched
    except ImportError:
        raise TunesmithError("tunesmith report needs matplotlib: pip install 'tunesmith[report]'") from None
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise TunesmithError("report: give at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    if explain:
        explain_runs(runs)
    return io.atomic_write(out, render(runs))
