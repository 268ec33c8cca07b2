"""Explanations (tunesmith.insight.explain, Task.explain): Integrated Gradients on a tiny BERT whose label is decided
by one planted token, the CLI's JSON and HTML, the most confident mistakes, image saliency, and the extra's
error message."""
import base64
import csv
import io
import json
import random
import sys

import pytest
from conftest import FILLER, NEGATIVE, POSITIVE, recipe_dict, tunesmith

pytest.importorskip("captum", reason="explanations need captum: pip install 'tunesmith[explain]'")

import tunesmith as ts

PLANTED = "superb"                                   # in a row: label "yes"; absent: "no"
DISTRACTORS = [w for w in POSITIVE + NEGATIVE if w != PLANTED]


def planted_rows(n: int, seed: int = 0) -> list[dict]:
    """Filler and distractor words in both classes alike; only the planted token decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(2, 5)) + rng.sample(DISTRACTORS, rng.randint(1, 2))
        if i % 2 == 0:
            words.append(PLANTED)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": "yes" if i % 2 == 0 else "no"})
    return rows


@pytest.fixture(scope="module")
def planted_run(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    with open(tmp / "planted.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(planted_rows(240))
    recipe = recipe_dict(tiny_bert, tmp / "planted.csv", train={"epochs": 8})
    run = ts.train(ts.load_recipe(recipe), run_dir=tmp / "run")
    assert run.metrics["accuracy"] >= 0.95                       # it learned the rule
    return run.path


def test_the_planted_token_gets_the_largest_attribution(planted_run):
    texts = [r["text"] for r in planted_rows(12, seed=1) if r["label"] == "yes"]          # 6 unseen sentences
    result = ts.explain(planted_run, texts, mistakes=0)
    assert [e["input"] for e in result["inputs"]] == texts and result["mistakes"] == []
    for e in result["inputs"]:
        assert e["predicted"] == "yes"
        assert len(e["tokens"]) == len(e["attributions"]) and e["tokens"][0] == "[CLS]"
        top = e["tokens"][max(range(len(e["tokens"])), key=lambda i: e["attributions"][i])]
        assert top == PLANTED, e
        others = [a for t, a in zip(e["tokens"], e["attributions"]) if t != PLANTED]
        assert max(e["attributions"]) > 2 * max(others), e                  # by a clear margin
        # completeness: attributions add up to logit(input) - logit(baseline), up to the path integral's error
        assert abs(e["convergence_delta"]) < 0.05 * abs(sum(e["attributions"])) + 1e-3, e


def test_cli_json_html_and_mistakes(planted_run, tmp_path):
    preds = [json.loads(x) for x in (planted_run / "predictions.jsonl").read_text().splitlines()]
    wrong = sorted((p for p in preds if p["predicted"] != p["label"]), key=lambda p: -p["confidence"])
    out = tunesmith("explain", planted_run, f"the film was {PLANTED}", "--json", "--mistakes", "3",
                    "--out", tmp_path / "x.html")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["task"] == "text-classification" and result["inputs"][0]["predicted"] == "yes"
    assert [m["row"] for m in result["mistakes"]] == [p["row"] for p in wrong[:3]]
    page = (tmp_path / "x.html").read_text()
    assert page.count('class="explained"') == 1 + len(wrong[:3]) and f">{PLANTED}</span>" in page
    assert "<script" not in page and "http" not in page


def test_missing_captum_names_the_extra(planted_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    model = ts.Run(planted_run).load("cpu")
    with pytest.raises(ts.TunesmithError, match=r"pip install 'tunesmith\[explain\]'"):
        model.task.explain(model.model, ["good"])
    from tunesmith.tasks.causal_lm import CausalLM
    assert not CausalLM.explainable


def test_image_saliency_overlay(tmp_path):
    """A tiny ResNet on generated stripes: a saliency grid in [0, 1] over the 32x32 input and a PNG overlay."""
    from PIL import Image
    from test_image_classification import image_folder, save_processor, tiny_model
    from test_image_classification import recipe_dict as image_recipe

    folder = tmp_path / "resnet"
    tiny_model("resnet").save_pretrained(folder)
    save_processor(folder)
    root = image_folder(tmp_path / "pictures", per_class=10)
    recipe = image_recipe(folder, root, train={"epochs": 1}, augment={"hflip": 0})
    run = ts.train(ts.load_recipe(recipe), run_dir=tmp_path / "run").path
    picture = str(root / "checker" / "0.png")
    (e,) = ts.explain(run, [picture], mistakes=0)["inputs"]
    grid = e["saliency"]
    assert len(grid) == 32 and {len(r) for r in grid} == {32}
    values = [v for r in grid for v in r]
    assert min(values) >= 0 and max(values) == pytest.approx(1.0) and len(set(values)) > 10
    head, b64 = e["overlay"].split(",", 1)
    assert head == "data:image/png;base64"
    overlay = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert overlay.size == (32, 32) and overlay.mode == "RGB"
    from tunesmith.insight.explain import render
    assert '<img class="saliency"' in render({"inputs": [e], "mistakes": []})
