"""`write_report(run_dirs, out)`: one self-contained HTML page about one or several run folders.

Apart from the explanations section it only reads files in the run folders (recipe.yaml, metrics.jsonl,
eval.json, checkpoints/best/state.json, and when present predictions.jsonl, samples.jsonl, doctor.json); with
explain=False it imports neither torch nor the training code, so it works on a laptop that holds nothing but
copied run folders. Plots are matplotlib PNGs (Agg
backend) embedded as base64 data URIs; there is no script and no external URL, so the page opens offline.

Sections (every one is always present, with a note where it does not apply, so tools can find them by id):
  overview        runs, task, model, steps, time, best checkpoint, the test metrics side by side
  curves          train/validation loss, the validation selection metric, learning rate, samples/s;
                  one colour per run, the best checkpoint's step marked (dashed line, star)
  confusion       confusion matrix heatmap per run (rows: true label, columns: predicted)
  per-class       precision / recall / F1 / support per label
  reliability     reliability diagram + ECE from per-example probabilities (eval.json "predictions" or
                  predictions.jsonl: one {"label", "probabilities": {name: p}} per test row)
  before-after    eval.json `before` against the fine-tuned metrics
  slices          per-slice metrics (eval.slices), gaps, parity differences; the largest gap flagged
  explanations    token attributions / saliency for the most confident mistakes (tunesmith/insight/explain.py: loads
                  the model, so this section alone needs torch and captum; write_report(explain=False) skips it)
  doctor          doctor.json status, blocking problems, warnings
  samples         generations of chat runs (samples.jsonl: prompt, reference, output)
  recipe-diff     recipe keys whose values differ between the runs
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import yaml

from tunesmith.errors import TunesmithError
from tunesmith.insight.fairness import GAP_METRICS, largest_gap

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]                       # matplotlib tab10, one per run (cycled past 10 runs)
STATE_KEYS = {"step", "rng", "scheduler", "optimizer", "epoch"}   # non-metric keys of checkpoints/best/state.json
MAX_LABELS_ANNOTATED = 25                              # confusion matrices larger than this lose cell numbers
BINS = 10                                              # reliability bins, equal width, as tunesmith.metrics
NO_PREDICTIONS = "reliability diagram needs predictions.jsonl"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td.l,th.l{text-align:left} img{max-width:100%} .note{color:#666;font-style:italic}
.swatch{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}
.clean{color:#2a7d2a;font-weight:bold} .warnings{color:#b07000;font-weight:bold} .blocking{color:#c00;font-weight:bold}
.flag{background:#fde2e1;border-left:4px solid #c00;padding:6px 10px} .tok{padding:1px 2px;border-radius:3px}
img.saliency{width:224px;image-rendering:pixelated} .explained{border-bottom:1px solid #eee;padding:4px 0}
pre{white-space:pre-wrap;background:#f7f7f7;padding:6px;margin:0;font-size:.9em}
"""


# ---------------------------------------------------------------- reading run folders

def _json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def load_run(path: str | Path) -> dict:
    """Everything the report shows about one run folder, read from disk only."""
    p = Path(path)
    if not (p / "recipe.yaml").exists() and not (p / "metrics.jsonl").exists():
        raise TunesmithError(f"{p} is not a run folder (no recipe.yaml or metrics.jsonl)")
    recipe = yaml.safe_load((p / "recipe.yaml").read_text()) if (p / "recipe.yaml").exists() else {}
    records = _json_lines(p / "metrics.jsonl")
    ev = _json(p / "eval.json") or {}
    state = _json(p / "checkpoints" / "best" / "state.json") or {}
    preds = ev.get("predictions") or _json_lines(p / "predictions.jsonl") or None
    run = {"path": p, "name": p.name, "recipe": recipe or {}, "records": records, "eval": ev, "state": state,
           "predictions": preds, "samples": _json_lines(p / "samples.jsonl"), "doctor": _json(p / "doctor.json")}
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


# ---------------------------------------------------------------- small helpers

def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return _e(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}"
    return _e(v)


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    """HTML table; the first `left` columns are left-aligned text, the rest formatted numbers."""
    cls = lambda i: ' class="l"' if i < left else ""
    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c if i < left else _fmt(c)}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig) -> str:
    """A matplotlib Figure as an <img> with a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def _run_label(i: int, run: dict) -> str:
    return f'<span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>{_e(run["name"])}'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{_e(title)}</h2>\n{body}\n</section>\n'


def _per_run(runs: list[dict], sid: str, render) -> str:
    """One <div id="{sid}-{i}"> per run, headed by the run name when there are several."""
    parts = []
    for i, run in enumerate(runs):
        head = f"<h3>{_run_label(i, run)}</h3>" if len(runs) > 1 else ""
        parts.append(f'<div class="run" id="{sid}-{i}">{head}{render(run)}</div>')
    return "\n".join(parts)


# ---------------------------------------------------------------- sections

def _overview(runs: list[dict]) -> str:
    rows = []
    for i, r in enumerate(runs):
        summ = next((x for x in reversed(r["records"]) if x.get("summary")), {})
        steps = max((x.get("step", 0) for x in r["records"]), default=0)
        best = r["state"].get(r["metric"]) if r["metric"] else None
        rows.append([_run_label(i, r), _e(r["recipe"].get("task", "?")),
                     _e((r["recipe"].get("model") or {}).get("name", r["recipe"].get("model", "?"))),
                     steps, summ.get("train_seconds"), _e(r["metric"]), r["best_step"], best])
    out = _table(["run", "task", "model", "steps", "train seconds", "selection metric", "best step", "best value"],
                 rows, left=3)
    keys = []                                   # scalar test metrics, in first-seen order across the runs
    for r in runs:
        keys += [k for k, v in r["eval"].items() if _scalar(v) and k not in keys]
    if keys:
        out += "<h3>Test metrics (eval.json)</h3>" + _table(
            ["metric"] + [r["name"] for r in runs], [[_e(k)] + [r["eval"].get(k) for r in runs] for k in keys])
    else:
        out += _note("no eval.json: the run did not finish")
    for r in runs:
        out += (f"<details><summary>recipe.yaml of {_e(r['name'])}</summary>"
                f"<pre>{_e(yaml.safe_dump(r['recipe'], sort_keys=False))}</pre></details>")
    return out


def _curves(runs: list[dict]) -> str:
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend
    if not any(r["records"] for r in runs):
        return _note("no metrics.jsonl records")
    fig = Figure(figsize=(12, 7.5))
    axes = fig.subplots(2, 2)
    (ax_loss, ax_metric), (ax_lr, ax_speed) = axes
    metrics = sorted({r["metric"] for r in runs if r["metric"]})
    for i, r in enumerate(runs):
        c = COLORS[i % len(COLORS)]
        train = [x for x in r["records"] if "split" not in x and not x.get("summary")]
        val = [x for x in r["records"] if x.get("split") == "validation"]
        series = lambda rows, key: ([x["step"] for x in rows if _scalar(x.get(key))],
                                    [x[key] for x in rows if _scalar(x.get(key))])
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
    return _png(fig)


def _confusion(run: dict) -> str:
    cm = run["eval"].get("confusion_matrix")
    if not cm:
        return _note("no confusion matrix in eval.json (not a classification run)")
    import numpy as np
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend
    labels, m = cm["labels"], np.asarray(cm["matrix"], dtype=float)     # m: [true, predicted] counts
    side = min(3 + 0.45 * len(labels), 14)            # inches: grows with the label count
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    shown = m / np.maximum(m.sum(1, keepdims=True), 1)                 # colour: share of each true label's row
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= MAX_LABELS_ANNOTATED:
        for t in range(len(labels)):
            for p in range(len(labels)):
                ax.text(p, t, f"{int(m[t, p])}", ha="center", va="center",
                        color="white" if shown[t, p] > .5 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=.046, label="share of true label")
    ax.set_title(f"confusion matrix ({int(m.sum())} test examples)", fontsize=10)
    return _png(fig)


def _per_class(run: dict) -> str:
    pc = run["eval"].get("per_class")
    if not pc:
        return _note("no per-class metrics in eval.json (not a classification run)")
    rows = [[_e(k), v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")] for k, v in pc.items()]
    ev = run["eval"]
    rows.append(["<b>macro</b>", ev.get("precision_macro"), ev.get("recall_macro"), ev.get("f1_macro"),
                 sum(v.get("support", 0) for v in pc.values())])
    return _table(["label", "precision", "recall", "F1", "support"], rows)


def reliability(predictions: list[dict], bins: int = BINS) -> dict:
    """Equal-width confidence bins: {ece, n, bins: [{lo, hi, count, confidence, accuracy}]} (as tunesmith.metrics)."""
    conf, hit = [], []
    for row in predictions:
        probs = row["probabilities"]
        top = max(probs, key=probs.get)
        conf.append(float(probs[top]))
        hit.append(str(top) == str(row["label"]))
    out, n, ece = [], len(conf), 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [j for j, c in enumerate(conf) if lo < c <= hi or (b == 0 and c == 0)]
        if idx:
            mc, acc = sum(conf[j] for j in idx) / len(idx), sum(hit[j] for j in idx) / len(idx)
            ece += len(idx) / n * abs(mc - acc)
            out.append({"lo": lo, "hi": hi, "count": len(idx), "confidence": mc, "accuracy": acc})
    return {"ece": ece if n else float("nan"), "n": n, "bins": out}


def _reliability(run: dict) -> str:
    if not run["predictions"]:
        extra = f" (eval.json ECE: {_fmt(run['eval']['ece'])})" if _scalar(run["eval"].get("ece")) else ""
        return f'<p class="note">{_e(NO_PREDICTIONS)}{extra}</p>'
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend
    rel = reliability(run["predictions"])
    fig = Figure(figsize=(5.5, 6.5))
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    w = 1 / BINS
    ax.bar([b["lo"] for b in rel["bins"]], [b["accuracy"] for b in rel["bins"]], width=w, align="edge",
           edgecolor="k", color="#4c72b0", label="accuracy")
    ax.bar([b["lo"] for b in rel["bins"]], [b["confidence"] - b["accuracy"] for b in rel["bins"]], width=w,
           bottom=[b["accuracy"] for b in rel["bins"]], align="edge", color="none", edgecolor="#c44e52",
           hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.set_title(f"reliability: ECE {rel['ece']:.4f} over {rel['n']} examples", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax_n.bar([b["lo"] for b in rel["bins"]], [b["count"] for b in rel["bins"]], width=w, align="edge",
             edgecolor="k", color="#999")
    ax_n.set(xlabel="confidence (top probability)", ylabel="examples")
    fig.tight_layout()
    return f'<p>ECE <b class="ece">{rel["ece"]:.4f}</b> ({rel["n"]} predictions, {BINS} bins)</p>' + _png(fig)


def _before_after(run: dict) -> str:
    before = run["eval"].get("before")
    if not before:
        return _note("no `before` in eval.json (eval.before was off)")
    keys = [k for k, v in run["eval"].items() if _scalar(v) and _scalar(before.get(k))]
    rows = [[_e(k), before[k], run["eval"][k], run["eval"][k] - before[k]] for k in keys]
    return _table(["metric", "before fine-tuning", "after", "change"], rows)


def _slices(run: dict) -> str:
    slices, fairness = run["eval"].get("slices"), run["eval"].get("fairness") or {}
    if not slices:
        return _note("no per-slice metrics in eval.json (set eval.slices: [column, ...] in a classification recipe)")
    out = ""
    top = largest_gap(fairness)
    if top:
        col, metric, gap = top
        out += (f'<p class="flag">largest gap: <b>{_e(metric)}</b> over <b>{_e(col)}</b>: {_fmt(gap["best"])} '
                f'({_e(gap["best_value"])}) vs {_fmt(gap["worst"])} ({_e(gap["worst_value"])}), a difference of '
                f'<b class="gap">{gap["difference"]:.4f}</b></p>')
    for col, table in slices.items():
        f = fairness.get(col, {})
        rows = [[_e(v)] + ([_e(m["too_small"])] + [""] * (len(GAP_METRICS) - 1) if "too_small" in m
                           else [m[k] for k in GAP_METRICS]) + [m["n"]] for v, m in table.items()]
        out += f"<h4>{_e(col)}</h4>" + _table(["value", *GAP_METRICS, "n"], rows, left=1)
        if "gaps" in f:
            out += _table(["gap (best - worst)", *GAP_METRICS, "demographic parity", "equal opportunity"],
                          [[_e(f"positive label {f['positive_label']}")]
                           + [f["gaps"][k]["difference"] for k in GAP_METRICS]
                           + [f["demographic_parity_difference"], f["equal_opportunity_difference"]]])
        else:
            out += _note(f.get("note", ""))
    return out


def _explanations(run: dict) -> str:
    from tunesmith.insight import explain

    if not run.get("explained"):
        return _note(run.get("explain_note") or "explanations not computed (--no-explain)")
    return explain.render(run["explained"])


def explain_runs(runs: list[dict]) -> None:
    """Each run's most confident mistakes, explained (needs its model/, torch and captum); else a note why not."""
    from tunesmith.insight import explain

    for r in runs:
        if not (r["path"] / "model").is_dir() or not (r["path"] / "predictions.jsonl").exists():
            r["explain_note"] = "no model/ or predictions.jsonl in the run folder (a classification run writes both)"
            continue
        try:
            r["explained"] = explain.explain(r["path"])
        except TunesmithError as e:         # no captum, a task without explanations
            r["explain_note"] = f"no explanations: {e}"


def _doctor(run: dict) -> str:
    d = run["doctor"]
    if not d:
        return _note("no doctor.json in the run folder (run `tunesmith doctor RECIPE --out RUN/doctor.json`)")
    status = str(d.get("status", "?"))
    out = f'<p>status: <span class="{_e(status)}">{_e(status)}</span></p>'
    for key in ("blocking", "warnings"):
        items = d.get(key) or []
        out += f"<h4>{key} ({len(items)})</h4>" + (
            "<ul>" + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul>" if items else _note("none"))
    return out


def _text(x) -> str:
    """A prompt as text: chat messages become 'role: content' lines."""
    if isinstance(x, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in x)
    return str(x)


def _samples(run: dict) -> str:
    if not run["samples"]:
        return _note("no samples.jsonl (only chat runs with eval.generate write generations)")
    rows = "".join("<tr>" + "".join(f'<td class="l"><pre>{_e(_text(s.get(k, "")))}</pre></td>'
                                    for k in ("prompt", "reference", "output")) + "</tr>" for s in run["samples"])
    return ('<table><tr><th class="l">prompt</th><th class="l">reference</th><th class="l">output</th></tr>'
            + rows + "</table>")


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
        return _note("one run: nothing to compare (give several run folders to see the recipe keys that differ)")
    diff = recipe_diff(runs)
    if not diff:
        return _note("the recipes are identical")
    show = lambda v: "<i>missing</i>" if not isinstance(v, (str, int, float, bool, list, type(None))) else _e(v)
    rows = "".join(f'<tr><td class="l">{_e(k)}</td>' + "".join(f'<td class="l">{show(v)}</td>' for v in vals)
                   + "</tr>" for k, vals in diff)
    head = "".join(f'<th class="l">{_run_label(i, r)}</th>' for i, r in enumerate(runs))
    return f'<table><tr><th class="l">recipe key</th>{head}</tr>{rows}</table>'


# ---------------------------------------------------------------- the page

def render(runs: list[dict]) -> str:
    title = "tunesmith report: " + ", ".join(r["name"] for r in runs)
    chat = [r for r in runs if r["samples"] or r["recipe"].get("task") == "causal-lm"]
    parts = [
        _section("overview", "Overview", _overview(runs)),
        _section("curves", "Training and validation curves", _curves(runs)),
        _section("confusion", "Confusion matrix", _per_run(runs, "confusion", _confusion)),
        _section("per-class", "Per-class precision / recall / F1", _per_run(runs, "per-class", _per_class)),
        _section("reliability", "Reliability diagram (calibration)", _per_run(runs, "reliability", _reliability)),
        _section("before-after", "Before and after fine-tuning", _per_run(runs, "before-after", _before_after)),
        _section("slices", "Slices (fairness)", _per_run(runs, "slices", _slices)),
        _section("explanations", "Why the model decided (explanations)",
                 _per_run(runs, "explanations", _explanations)),
        _section("doctor", "Data doctor", _per_run(runs, "doctor", _doctor)),
        _section("samples", "Sample generations",
                 _per_run(chat, "samples", _samples) if chat else _note("no chat runs: no generations")),
        _section("recipe-diff", "Recipe differences", _recipe_diff(runs)),
    ]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n" + "".join(parts) + "</body></html>\n")


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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs), encoding="utf-8")
    return out
