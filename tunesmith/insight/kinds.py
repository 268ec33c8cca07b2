"""The report's sections that depend on what a run predicts (its task's `prediction` kind, tunesmith/tasks/outputs.py):
one table, SECTIONS[kind][section id] -> renderer(run) -> HTML. A section a kind has no renderer for says so.

  label   confusion matrix, per-class metrics, reliability diagram (predictions.jsonl), slices (eval.slices)
  text    samples.jsonl: prompt, reference, output
  spans   per-type metrics (eval.json per_type); samples.jsonl: the input with the predicted and the reference
          spans highlighted, then the first MISCLASSIFIED_LISTED sentences of misclassified.jsonl alike
  boxes   per-class AP (eval.json per_class), precision-recall curves per class (pr_curves.json); samples.jsonl:
          each image with its true (green) and predicted (red) boxes drawn, and the boxes listed
"""
from __future__ import annotations

from tunesmith.insight.fairness import GAP_METRICS, largest_gap
from tunesmith.insight.page import e, fmt, note, picture, png, scalar, table

MAX_LABELS_ANNOTATED = 25                              # confusion matrices larger than this lose cell numbers
BINS = 10                                              # reliability bins, equal width, as tunesmith.metrics
NO_PREDICTIONS = "reliability diagram needs predictions.jsonl"
MISCLASSIFIED_LISTED = 20                              # spans: misclassified sentences shown (all are in the file)
MAX_PR_CLASSES = 24                                    # boxes: precision-recall subplots drawn (all are in the file)
TRUE_COLOR = (40, 170, 60)                             # boxes: true boxes drawn green (predicted: draw_boxes' red)


# ---------------------------------------------------------------- label

def confusion(run: dict) -> str:
    cm = run["eval"].get("confusion_matrix")
    if not cm:
        return note("no confusion matrix in eval.json (the run did not finish)")
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
    return png(fig)


def per_class(run: dict) -> str:
    pc = run["eval"].get("per_class")
    if not pc:
        return note("no per-class metrics in eval.json (the run did not finish)")
    rows = [[e(k), v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")] for k, v in pc.items()]
    ev = run["eval"]
    rows.append(["<b>macro</b>", ev.get("precision_macro"), ev.get("recall_macro"), ev.get("f1_macro"),
                 sum(v.get("support", 0) for v in pc.values())])
    return table(["label", "precision", "recall", "F1", "support"], rows)


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


def reliability_diagram(run: dict) -> str:
    if not run["predictions"]:
        extra = f" (eval.json ECE: {fmt(run['eval']['ece'])})" if scalar(run["eval"].get("ece")) else ""
        return f'<p class="note">{e(NO_PREDICTIONS)}{extra}</p>'
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
    return f'<p>ECE <b class="ece">{rel["ece"]:.4f}</b> ({rel["n"]} predictions, {BINS} bins)</p>' + png(fig)


def slices(run: dict) -> str:
    found, fairness = run["eval"].get("slices"), run["eval"].get("fairness") or {}
    if not found:
        return note("no per-slice metrics in eval.json (set eval.slices: [column, ...] in the recipe)")
    out = ""
    top = largest_gap(fairness)
    if top:
        col, metric, gap = top
        out += (f'<p class="flag">largest gap: <b>{e(metric)}</b> over <b>{e(col)}</b>: {fmt(gap["best"])} '
                f'({e(gap["best_value"])}) vs {fmt(gap["worst"])} ({e(gap["worst_value"])}), a difference of '
                f'<b class="gap">{gap["difference"]:.4f}</b></p>')
    for col, by_value in found.items():
        f = fairness.get(col, {})
        rows = [[e(v)] + ([e(m["too_small"])] + [""] * (len(GAP_METRICS) - 1) if "too_small" in m
                          else [m[k] for k in GAP_METRICS]) + [m["n"]] for v, m in by_value.items()]
        out += f"<h4>{e(col)}</h4>" + table(["value", *GAP_METRICS, "n"], rows, left=1)
        if "gaps" in f:
            out += table(["gap (best - worst)", *GAP_METRICS, "demographic parity", "equal opportunity"],
                         [[e(f"positive label {f['positive_label']}")]
                          + [f["gaps"][k]["difference"] for k in GAP_METRICS]
                          + [f["demographic_parity_difference"], f["equal_opportunity_difference"]]])
        else:
            out += note(f.get("note", ""))
    return out


def label_samples(run: dict) -> str:
    return note("label predictions are summed up above: confusion matrix, per-class metrics, reliability "
                "(predictions.jsonl)")


# ---------------------------------------------------------------- text, spans, boxes

def _cells(samples: list[dict], keys: tuple[str, ...], cell) -> str:
    head = "".join(f'<th class="l">{e(k)}</th>' for k in keys)
    rows = "".join("<tr>" + "".join(f'<td class="l">{cell(k, s.get(k))}</td>' for k in keys) + "</tr>"
                   for s in samples)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _text(x) -> str:
    """A prompt as text: chat messages become 'role: content' lines."""
    if isinstance(x, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in x)
    return "" if x is None else str(x)


def text_samples(run: dict) -> str:
    if not run["samples"]:
        return note("no samples.jsonl (generations are written when the recipe sets eval.generate)")
    return _cells(run["samples"], ("prompt", "reference", "output"), lambda k, v: f"<pre>{e(_text(v))}</pre>")


def highlight(text: str, spans: list[dict]) -> str:
    """`text` as HTML with each span (start/end character offsets) in a <mark> carrying its label."""
    out, at = [], 0
    for s in sorted(spans, key=lambda s: s["start"]):
        if s["start"] < at:                             # overlapping: the first one wins
            continue
        tip = f'{s["label"]} {s["score"]:.3f}' if scalar(s.get("score")) else s["label"]
        out += [e(text[at:s["start"]]), f'<mark title="{e(tip)}">{e(text[s["start"]:s["end"]])}'
                                        f'<sub>{e(s["label"])}</sub></mark>']
        at = s["end"]
    return "".join(out + [e(text[at:])])


def per_type(run: dict) -> str:
    types = run["eval"].get("per_type")
    if types is None:
        return note("no per-type metrics in eval.json (the run did not finish)")
    ev = run["eval"]
    rows = [[e(k), v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")] for k, v in types.items()]
    rows += [[f"<b>{avg}</b>", ev.get(f"precision{sfx}"), ev.get(f"recall{sfx}"), ev.get(f"f1{sfx}"),
              sum(v.get("support", 0) for v in types.values())] for avg, sfx in (("micro", ""), ("macro", "_macro"))]
    return table(["entity type", "precision", "recall", "F1", "support"], rows)


def _highlighted(samples: list[dict]) -> str:
    rows = [{k: highlight(str(s.get("input", "")), (s.get(k) or {}).get("spans", [])) for k in ("output", "reference")}
            for s in samples]
    return _cells(rows, ("output", "reference"), lambda k, v: v)


def spans_samples(run: dict) -> str:
    out = (_highlighted(run["samples"]) if run["samples"]
           else note("no samples.jsonl (the task writes its first test predictions there)"))
    wrong, n = run.get("misclassified") or [], run["eval"].get("misclassified")
    count = f" ({n:,})" if scalar(n) else ""
    out += f'<h4 id="misclassified">Misclassified sentences: predicted entities differ from the reference{count}</h4>'
    if not wrong:
        return out + note("none" if n == 0 else "no misclassified.jsonl in the run folder")
    shown = wrong[:MISCLASSIFIED_LISTED]
    more = f"the first {len(shown)} of {len(wrong)}; " if len(wrong) > len(shown) else ""
    return out + note(f"{more}every one is in misclassified.jsonl") + _highlighted(shown)


def _boxes(boxes: list[dict]) -> str:
    if not boxes:
        return '<span class="note">none</span>'
    return "<br>".join(f'{e(b["label"])} {fmt(b.get("score"))} at [{", ".join(f"{x:.0f}" for x in b["box"])}]'
                       for b in boxes)


def boxes_samples(run: dict) -> str:
    if not run["samples"]:
        return note("no samples.jsonl (the task writes its first test predictions there)")
    rows = [{**s, "drawn": s} for s in run["samples"]]
    return (note("drawn: true boxes green, predicted boxes red (above eval.score_threshold)")
            + _cells(rows, ("input", "drawn", "output", "reference"),
                     lambda k, v: e(v) if k == "input" else _drawn(v) if k == "drawn"
                     else _boxes((v or {}).get("boxes", []))))


def _drawn(sample: dict) -> str:
    """The sample's image (its "image" value: a path, data: URI) with its true boxes in green and its predicted boxes
    in red on top, or a note why not (a run folder copied without its images)."""
    from tunesmith.vision import draw_boxes

    if sample.get("image") in (None, ""):
        return '<span class="note">no image in samples.jsonl</span>'
    try:
        image = draw_boxes(sample["image"], (sample.get("reference") or {}).get("boxes", []), color=TRUE_COLOR)
        image = draw_boxes(image, (sample.get("output") or {}).get("boxes", []))
    except Exception as err:            # PIL raises OSError, ValueError, UnidentifiedImageError...: one note
        return f'<span class="note">image not readable here ({e(type(err).__name__)})</span>'
    return picture(image, alt=f"boxes on {sample.get('input', 'image')}")


def box_per_class(run: dict) -> str:
    """eval.json's per-class AP@[.5:.95] and AP@.5 (-1: no true box of the class in the test split), mAP last."""
    pc, ev = run["eval"].get("per_class"), run["eval"]
    if pc is None:
        return note("no per-class AP in eval.json (the run did not finish)")
    rows = [[e(k), v.get("ap"), v.get("ap_50")] for k, v in pc.items()]
    rows.append(["<b>mean (mAP)</b>", ev.get("map"), ev.get("map_50")])
    return table(["class", "AP@[.5:.95]", "AP@.5"], rows) + note("-1: no true box of the class in the test split")


def pr_figure(curves: dict):
    """One subplot per class (at most MAX_PR_CLASSES): precision against recall at IoU .5 and averaged over
    IoU .5:.95, from pr_curves.json; undefined points (-1) are left out."""
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no GUI backend

    names = list(curves["classes"])[:MAX_PR_CLASSES]
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.2 * cols, 3 * rows))
    axes = iter(fig.subplots(rows, cols, squeeze=False).flat)
    recall = curves["recall"]
    for name, ax in zip(names, axes):          # names first: zip then takes no spare axis
        for key, style, label in (("iou_50", "-", "IoU .5"), ("iou_50_95", "--", "IoU .5:.95")):
            pts = [(r, p) for r, p in zip(recall, curves["classes"][name][key]) if p > -1]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(str(name), fontsize=10)
        ax.grid(alpha=.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower left")
        else:
            ax.text(.5, .5, "no true box", ha="center", va="center")
    for ax in axes:                             # the grid's unused cells
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def pr_curves(run: dict) -> str:
    curves = run.get("pr_curves")
    if not curves or not curves.get("classes"):
        return note("no pr_curves.json in the run folder (the run did not finish, or its test split has no boxes)")
    names = list(curves["classes"])
    more = (f"the first {MAX_PR_CLASSES} of {len(names)} classes; every curve is in pr_curves.json. "
            if len(names) > MAX_PR_CLASSES else "")
    return note(f"{more}COCO's 101 recall points, all box sizes, up to eval.max_detections boxes an image") + png(
        pr_figure(curves))


SECTIONS = {
    "label": {"confusion": confusion, "per-class": per_class, "reliability": reliability_diagram, "slices": slices,
              "samples": label_samples},
    "text": {"samples": text_samples},
    "spans": {"per-class": per_type, "samples": spans_samples},
    "boxes": {"per-class": box_per_class, "pr-curves": pr_curves, "samples": boxes_samples},
}


def draw(run: dict, sid: str) -> str:
    """Section `sid` of one run, as its prediction kind draws it, or a note saying why it has none."""
    kind, task = run.get("prediction"), run["recipe"].get("task", "?")
    render = SECTIONS.get(kind, {}).get(sid)
    if render:
        return render(run)
    if kind is None:
        return note(f"task '{task}' is not known to this tunesmith (register it to see what it predicts)")
    return note(f"does not apply: task '{task}' predicts {kind}")
