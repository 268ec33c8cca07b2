"""`ts.explain(run_dir, inputs)`: why a run's model predicts what it does, for given inputs and for its most
confident mistakes on the test split (predictions.jsonl, written by training for classification runs).

The attributions come from the task (`Task.explain`, where `Task.explainable`): token attributions by
Integrated Gradients for text, a saliency overlay for images. `render(result)` is the HTML fragment that both
`tunesmith explain --out` and the report's explanations section show; it needs nothing beyond the JSON.
"""
from __future__ import annotations

import html
from pathlib import Path

from tunesmith import io
from tunesmith.errors import TunesmithError
from tunesmith.run import Run

MISTAKES = 5                    # most confident mistakes explained by default


def confident_mistakes(run: Run, limit: int) -> list[dict]:
    """predictions.jsonl rows whose prediction is wrong, most confident first (at most `limit`)."""
    wrong = [r for r in io.read_jsonl(run.path / "predictions.jsonl") if r["predicted"] != r["label"]]
    return sorted(wrong, key=lambda r: -r["confidence"])[:limit]


def explain(run_dir: str | Path, inputs=(), mistakes: int = MISTAKES, device: str = "auto") -> dict:
    """{"run", "task", "inputs": [one explanation per input], "mistakes": [the most confident mistakes on the
    test split, each with its "row" in data/test.jsonl and true "label"]}. An input is what `predict` takes."""
    from tunesmith.splits import load_rows

    run = Run(run_dir)
    model = run.load(device)
    task = model.task
    if not task.explainable:
        raise TunesmithError(f"task '{task.name}' has no explanations")
    import torch

    wrong = confident_mistakes(run, mistakes)
    test = load_rows(task, str(run.path / "data" / "test.jsonl")) if wrong else []
    with torch.no_grad():                  # a Predictor of our own: no other thread uses it
        given = task.explain(model.model, list(inputs)) if inputs else []
        found = task.explain(model.model, [test[w["row"]] for w in wrong]) if wrong else []
    return {"run": str(run.path), "task": task.name, "inputs": given,
            "mistakes": [{"row": w["row"], "label": w["label"], **e} for w, e in zip(wrong, found)]}


# ---------------------------------------------------------------- HTML

def _token_html(token: str, weight: float, top: float) -> str:
    """A token on a background: red where it pushes toward the prediction, blue where against."""
    share = abs(weight) / top if top else 0.0
    rgb = "214,39,40" if weight > 0 else "31,119,180"
    return (f'<span class="tok" title="{weight:+.4f}" style="background:rgba({rgb},{share:.2f})">'
            f"{html.escape(token)}</span>")


def _item(e: dict) -> str:
    head = f"predicted <b>{html.escape(str(e['predicted']))}</b> ({e['probability']:.3f})"
    if "label" in e:
        head += f", label <b>{html.escape(str(e['label']))}</b> (test row {e['row']})"
    if "tokens" in e:
        top = max((abs(a) for a in e["attributions"]), default=0.0)
        body = " ".join(_token_html(t, a, top) for t, a in zip(e["tokens"], e["attributions"]))
    else:
        body = f'<img class="saliency" alt="saliency overlay of {html.escape(e["input"])}" src="{e["overlay"]}">'
    return f'<div class="explained"><p>{head}</p><p>{body}</p></div>'


def render(result: dict) -> str:
    """The explanations as an HTML fragment (no script, no external URL)."""
    parts = ['<p class="note">text: Integrated Gradients on the word embeddings toward the predicted label '
             '(red: pushes toward it, blue: against; hover for the value); images: gradient saliency, in red</p>']
    for key, title in (("inputs", "Given inputs"), ("mistakes", "Most confident mistakes (test split)")):
        items = result.get(key) or []
        if key == "inputs" and not items:
            continue
        parts.append(f"<h3>{title}</h3>" + ("".join(_item(e) for e in items) if items else
                                            '<p class="note">no mistakes in predictions.jsonl</p>'))
    return "\n".join(parts)


CSS = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px} .tok{padding:1px 2px;border-radius:3px}"
       " .explained{border-bottom:1px solid #eee;padding:4px 0} .note{color:#666;font-style:italic}"
       " img.saliency{width:224px;image-rendering:pixelated}")


def write_html(result: dict, out: str | Path) -> Path:
    title = html.escape(f"tunesmith explain: {Path(result['run']).name}")
    return io.atomic_write(out, f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
                           f"<style>{CSS}</style></head><body><h1>{title}</h1>\n{render(result)}\n</body></html>\n")
