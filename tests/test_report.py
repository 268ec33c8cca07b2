"""The HTML run report (tunesmith.insight.report), per-slice evaluation (tunesmith.insight.fairness) and the tracking
callbacks (tunesmith.insight.tracking) on tiny real runs.

Two tiny text-classification runs are trained once per module (different learning rates, a few seconds each).
Run A has eval.before, eval.slices (a `source` column) and train.report_to: [tensorboard, mlflow], and a
doctor.json; run B has none of these, and its predictions.jsonl is removed (as in a run from before that file).
"""
import base64
import csv
import io
import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Literal

import pytest
import yaml
from conftest import recipe_dict, write_reviews

pytest.importorskip("matplotlib", reason="the report needs matplotlib: pip install 'tunesmith[report]'")

import tunesmith as ts
from tunesmith.insight.fairness import evaluate_slices, largest_gap
from tunesmith.insight.kinds import NO_PREDICTIONS, reliability
from tunesmith.insight.report import write_report

SECTIONS = ["overview", "curves", "confusion", "per-class", "reliability", "pr-curves", "before-after", "slices",
            "explanations", "doctor", "samples", "recipe-diff"]
IMG = re.compile(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
DOCTOR = {"version": 1, "status": "warnings", "blocking": [],
          "warnings": ["train: 3 exact duplicate rows (a dedup would drop them)"]}


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.DOTALL)
    assert m, f"no section {sid}"
    return m.group(1)


def with_source(path: Path) -> Path:
    """The reviews with a `source` column: print (1 in 3 rows), fax (1 in 20: too few to judge), web."""
    rows = list(csv.DictReader(open(path)))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label", "source"])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**r, "source": "fax" if i % 20 == 7 else "print" if i % 3 == 0 else "web"})
    return path


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):
    pytest.importorskip("tensorboard", reason="pip install 'tunesmith[tracking]'")
    pytest.importorskip("mlflow", reason="pip install 'tunesmith[tracking]'")
    tmp = tmp_path_factory.mktemp("report")
    data = with_source(write_reviews(tmp / "reviews.csv", n=240))
    recipe = recipe_dict(tiny_bert, data, eval={"before": True, "slices": ["source"], "min_slice_size": 5},
                         train={"epochs": 10, "report_to": ["tensorboard", "mlflow"]})
    a = ts.train(ts.load_recipe(recipe), run_dir=tmp / "a").path
    b = ts.train(ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 6, "learning_rate": 1e-3})),
                 run_dir=tmp / "b").path
    (b / "predictions.jsonl").unlink()
    (a / "doctor.json").write_text(json.dumps(DOCTOR))
    return SimpleNamespace(a=a, b=b, tmp=tmp)


@pytest.fixture(scope="module")
def report_a(runs):
    return write_report([runs.a], runs.tmp / "report-a.html").read_text()


def test_report_has_every_section_embedded_images_and_no_external_urls(runs, report_a):
    html = report_a
    for sid in SECTIONS:
        section(html, sid)
    images = IMG.findall(html)
    assert len(images) == 3                                 # curves, confusion matrix, reliability diagram
    for b64 in images:
        import matplotlib.image
        assert matplotlib.image.imread(io.BytesIO(base64.b64decode(b64)), format="png").shape[0] > 100
    text = IMG.sub("<img>", html).lower()            # base64 payloads could spell anything: look outside them
    assert "http" not in text and "<script" not in text and "<link" not in text and "url(" not in text
    assert re.findall(r'(?:src|href)="([^"]*)"', text) == []
    assert len(IMG.findall(section(html, "curves"))) == 1 and len(IMG.findall(section(html, "confusion"))) == 1
    ev = json.loads((runs.a / "eval.json").read_text())
    per_class = section(html, "per-class")
    for label, v in ev["per_class"].items():
        assert f"<td class=\"l\">{label}</td><td>{v['precision']:.4f}</td>" in per_class
    best = json.loads((runs.a / "checkpoints" / "best" / "state.json").read_text())["step"]
    assert f"<td>{best}</td>" in section(html, "overview")
    before_after = section(html, "before-after")
    assert "before fine-tuning" in before_after and f"{ev['before']['accuracy']:.4f}" in before_after
    doctor = section(html, "doctor")
    assert 'class="warnings">warnings<' in doctor and "3 exact duplicate rows" in doctor and "blocking (0)" in doctor
    assert "one run: nothing to compare" in section(html, "recipe-diff")
    slices = section(html, "slices")
    assert 'class="flag">largest gap' in slices and "<td class=\"l\">print</td>" in slices
    assert "too small to judge" in slices
    explained = section(html, "explanations")
    wrong = [p for p in jsonl(runs.a / "predictions.jsonl") if p["predicted"] != p["label"]]
    assert explained.count('class="explained"') == min(5, len(wrong))
    if wrong:
        top = max(wrong, key=lambda p: p["confidence"])
        assert 'class="tok"' in explained and f"test row {top['row']}" in explained


def test_predictions_jsonl_matches_pipeline_and_eval_json_ece(runs, report_a):
    """Training wrote predictions.jsonl: the probabilities transformers' pipeline gives for the test rows, and
    the report's ECE recomputed from them equals the ECE in eval.json."""
    from transformers import pipeline

    preds = jsonl(runs.a / "predictions.jsonl")
    rows = jsonl(runs.a / "data" / "test.jsonl")
    assert [p["row"] for p in preds] == list(range(len(rows)))
    assert [p["label"] for p in preds] == [r["label"] for r in rows]
    pipe = pipeline("text-classification", model=str(runs.a / "model"), top_k=None)
    for p, out in zip(preds[:8], pipe([r["text"] for r in rows[:8]])):
        assert p["probabilities"] == pytest.approx({o["label"]: o["score"] for o in out}, abs=1e-5)
        assert p["predicted"] == max(out, key=lambda o: o["score"])["label"]
    rel = reliability(preds)
    ev = json.loads((runs.a / "eval.json").read_text())
    assert rel["n"] == len(preds) == 48 and sum(b["count"] for b in rel["bins"]) == 48
    assert rel["ece"] == pytest.approx(ev["ece"], abs=1e-4)
    assert f'class="ece">{rel["ece"]:.4f}<' in section(report_a, "reliability")


def test_reliability_needs_predictions(runs, tmp_path):
    html = write_report([runs.b], tmp_path / "b.html").read_text()
    rel = section(html, "reliability")
    assert NO_PREDICTIONS in rel and "<img" not in rel
    assert "no doctor.json" in section(html, "doctor") and "no `before`" in section(html, "before-after")


def test_several_runs_overlaid_with_recipe_diff(runs, tmp_path):
    html = write_report([runs.a, runs.b], tmp_path / "ab.html").read_text()
    for sid in SECTIONS:
        section(html, sid)
    assert len(IMG.findall(section(html, "curves"))) == 1           # one figure, both runs overlaid
    assert len(IMG.findall(section(html, "confusion"))) == 2         # one matrix per run
    assert 'id="confusion-0"' in html and 'id="confusion-1"' in html
    diff = section(html, "recipe-diff")
    keys = re.findall(r'<tr><td class="l">([^<]+)</td>', diff)
    assert set(keys) == {"train.learning_rate", "train.epochs", "eval.before", "eval.slices", "eval.min_slice_size",
                         "train.report_to"}, keys
    assert "0.003" in diff and "0.001" in diff
    assert "#1f77b4" in diff and "#ff7f0e" in diff                  # each run's colour swatch


def test_chat_run_shows_sample_generations(tmp_path):
    """A causal-LM run folder (written by hand: format of CausalLM.evaluate_final) shows its samples, as its task
    declares (prediction "text": no label sections); a torn last line of metrics.jsonl (a crash mid-write) is
    skipped."""
    run = tmp_path / "chat"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": "causal-lm", "model": {"name": "tiny-gpt"},
                                                     "train": {"metric": None}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "epoch": 0.5, "loss": 3.0, "lr": 1e-3, "samples_per_s": 10.0, "tokens_per_s": 900.0},
        {"step": 2, "epoch": 1.0, "loss": 2.5, "lr": 5e-4, "samples_per_s": 11.0, "tokens_per_s": 950.0},
        {"step": 2, "epoch": 1, "split": "validation", "loss": 2.7, "perplexity": 14.9},
        {"step": 2, "summary": True, "train_seconds": 1.5}]) + '{"step": 3, "lo')
    (run / "eval.json").write_text(json.dumps({"loss": 2.6, "perplexity": 13.5, "exact_match": 0.25,
                                               "rouge_l": 0.5}))
    (run / "samples.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 2 + <b>2</b>?"}],
                                                   "reference": "4", "output": "four"}) + "\n")
    html = write_report([run], tmp_path / "chat.html").read_text()
    samples = section(html, "samples")
    assert "user: What is 2 + &lt;b&gt;2&lt;/b&gt;?" in samples and "<td class=\"l\"><pre>four</pre></td>" in samples
    assert "does not apply: task 'causal-lm' predicts text" in unescape(section(html, "confusion"))
    assert '<td class="l">text</td>' in section(html, "overview")                       # what it predicts
    assert "<td>0.5000</td>" in section(html, "overview")            # rouge_l among the test metrics
    assert len(IMG.findall(section(html, "curves"))) == 1


class Boxes(ts.Task):
    name, prediction = "report-boxes", "boxes"


class Spans(ts.Task):
    name, prediction = "report-spans", "spans"


class BoxesRecipe(ts.Recipe):
    task_class: ClassVar = Boxes
    task: Literal["report-boxes"]


class SpansRecipe(ts.Recipe):
    task_class: ClassVar = Spans
    task: Literal["report-spans"]


SAMPLES = {
    "report-boxes": {"input": "street.png",
                     "output": {"boxes": [{"box": [1, 2, 30.4, 40], "label": "car", "score": .9}]},
                     "reference": {"boxes": [{"box": [0, 2, 31, 41], "label": "car", "score": 1.0},
                                             {"box": [50, 5, 60, 20], "label": "sign", "score": 1.0}]}},
    "report-spans": {"input": "Ada met <Bob> in Paris",
                     "output": {"spans": [{"text": "Ada", "start": 0, "end": 3, "label": "PER", "score": .97},
                                          {"text": "Paris", "start": 17, "end": 22, "label": "LOC", "score": .8}]},
                     "reference": {"spans": [{"text": "<Bob>", "start": 8, "end": 13, "label": "PER", "score": 1}]}},
}


@pytest.mark.parametrize("task", ["report-boxes", "report-spans"])
def test_spans_and_boxes_runs_are_drawn_by_their_kind(task, tmp_path):
    """Runs of tasks that predict boxes or spans (hand-written folders; the tasks are declarations only): the
    samples section draws their predictions by kind, the label sections say they do not apply; a run of a task this
    process does not know still gets its report, with a note."""
    ts.register_task(BoxesRecipe if task == "report-boxes" else SpansRecipe)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": task, "model": {"name": "tiny"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-3}) + "\n")
    (run / "samples.jsonl").write_text(json.dumps(SAMPLES[task]) + "\n")
    html = write_report([run], tmp_path / "r.html", explain=False).read_text()
    samples = section(html, "samples")
    kind = task.split("-")[1]
    assert f"does not apply: task '{task}' predicts {kind}" in unescape(section(html, "confusion"))
    if kind == "boxes":
        assert "street.png" in samples and "car 0.9000 at [1, 2, 30, 40]" in samples
        assert "car 1.0000 at [0, 2, 31, 41]<br>sign 1.0000 at [50, 5, 60, 20]" in samples       # the reference
    else:
        assert '<mark title="PER 0.970">Ada<sub>PER</sub></mark> met &lt;Bob&gt; in <mark title="LOC 0.800">Paris' \
               '<sub>LOC</sub></mark>' in samples
        assert 'Ada met <mark title="PER 1.000">&lt;Bob&gt;<sub>PER</sub></mark> in Paris' in samples
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": "nobody-knows", "model": {"name": "tiny"}}))
    html = write_report([run], tmp_path / "r.html", explain=False).read_text()
    assert "task 'nobody-knows' is not known to this tunesmith" in unescape(section(html, "samples"))


def test_missing_matplotlib_names_the_extra(runs, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ts.TunesmithError, match=r"pip install 'tunesmith\[report\]'"):
        write_report([runs.a], tmp_path / "x.html")


# ---------------------------------------------------------------- the report in a real browser

PROBE = ('<script>window.addEventListener("load",()=>{const b=[...document.images].filter(i=>!(i.complete&&'
         'i.naturalWidth>0));console.log("PROBE images="+document.images.length+" broken="+b.length+" sections="+'
         'document.querySelectorAll("section[id]").length)})</script>')


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium/chrome on PATH (Debian: apt-get install -y chromium)")


def open_in_chromium(html: Path, png: Path, profile: Path) -> tuple[list[str], str]:
    """Load `html` headless, screenshot it; (console lines, stderr). Console lines include page errors."""
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", f"--screenshot={png}",
           "--window-size=1200,3000", "--virtual-time-budget=5000", html.resolve().as_uri()]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    console = [x for x in out.stderr.splitlines() if "CONSOLE" in x or "Uncaught" in x]
    return console, out.stderr


def console_problems(console: list[str]) -> list[str]:
    """Every console line except our probe's: the report has no script, so any message is a problem."""
    return [x for x in console if '"PROBE ' not in x]


def test_report_opens_in_headless_chromium(runs, report_a, tmp_path):
    page = tmp_path / "probed.html"                 # the report plus a probe script (the report has none)
    page.write_text(report_a.replace("</body>", PROBE + "</body>"))
    png = tmp_path / "shot.png"
    console, stderr = open_in_chromium(page, png, tmp_path / "profile")
    assert not console_problems(console), console
    probe = [x for x in console if '"PROBE ' in x]
    assert probe and "images=3 broken=0 sections=12" in probe[0], (probe, stderr[-2000:])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    pixels = matplotlib.image.imread(png)           # [3000, 1200, channels] floats in 0..1
    assert pixels.shape[:2] == (3000, 1200) and pixels.std() > 0.05          # not a blank page


def test_browser_check_catches_errors_and_broken_images(report_a, tmp_path):
    """The checks above can fail: a page error and a corrupt embedded PNG are both seen."""
    bad = report_a.replace("base64,iVBOR", "base64,XXXX", 1).replace(
        "</body>", '<script>throw new Error("boom")</script>' + PROBE + "</body>")
    page = tmp_path / "bad.html"
    page.write_text(bad)
    console, _ = open_in_chromium(page, tmp_path / "bad.png", tmp_path / "profile")
    assert any("Uncaught Error: boom" in x for x in console_problems(console)), console
    assert any("broken=1" in x for x in console), console


# ---------------------------------------------------------------- tracking callbacks, read back

def test_tracking_reads_back_from_a_run_trained_with_report_to(runs):
    """train.report_to: [tensorboard, mlflow] sent every metrics.jsonl record, the recipe and eval.json to both."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    run, recs = runs.a, records(runs.a)
    expected = {}                                   # tag -> [(step, value)] straight from metrics.jsonl
    for r in recs:
        prefix = "summary" if r.get("summary") else r.get("split", "train")
        for k, v in r.items():
            if k not in ("step", "split", "summary") and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(f"{prefix}/{k}", []).append((r["step"], v))
    assert {"train/loss", "train/lr", "train/samples_per_s", "validation/accuracy", "summary/train_seconds"} <= set(
        expected)
    assert len(expected["validation/accuracy"]) == 10 and len(expected["train/loss"]) == 90   # 10 epochs x 9 steps
    ev = json.loads((run / "eval.json").read_text())
    last = max(r["step"] for r in recs)

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    for tag, want in expected.items():
        got = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
        assert got == want, tag
    value = lambda tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
    assert value("test/accuracy") == [(last, ev["accuracy"])]
    assert value("test/slices/source/print/accuracy") == [(last, ev["slices"]["source"]["print"]["accuracy"])]
    assert value("test/before/loss") == [(last, ev["before"]["loss"])]
    text = tensor_util.make_ndarray(acc.Tensors("recipe/text_summary")[0].tensor_proto).item().decode()
    assert "learning_rate: 0.003" in text and "report_to:" in text

    client = MlflowClient(f"sqlite:///{run.resolve() / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("tunesmith").experiment_id])
    for tag, want in expected.items():
        got = [(m.step, m.value) for m in sorted(client.get_metric_history(found.info.run_id, tag),
                                                 key=lambda m: m.step)]
        assert got == want, tag
    assert found.info.status == "FINISHED" and found.info.run_name == "a"
    assert found.data.metrics["test/accuracy"] == ev["accuracy"]
    assert found.data.metrics["test/fairness/source/demographic_parity_difference"] == \
        ev["fairness"]["source"]["demographic_parity_difference"]
    assert found.data.params["train.learning_rate"] == "0.003" and found.data.params["task"] == "text-classification"
    assert {f.path for f in client.list_artifacts(found.info.run_id)} == {"recipe.yaml", "eval.json"}
    assert (run / "mlartifacts").is_dir() and not (Path.cwd() / "mlruns").exists()
    assert not (runs.b / "tensorboard").exists() and not (runs.b / "mlflow.db").exists()      # report_to: [] is off


def test_report_to_without_the_package_names_the_extra(monkeypatch, tmp_path):
    import sys

    from tunesmith.insight.tracking import callbacks_for

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    train = ts.load_recipe({"task": "text-classification", "model": "m", "data": {"train": "x.csv"},
                            "train": {"report_to": ["mlflow"]}}).train
    with pytest.raises(ts.TunesmithError, match=r"pip install 'tunesmith\[tracking\]'"):
        callbacks_for(train, tmp_path)


# ---------------------------------------------------------------- per-slice evaluation

def test_slice_metrics_against_a_hand_computed_fixture():
    """labels neg=0, pos=1 (positive: pos, the second of two). Slice a: true 1 1 0 0, predicted 1 0 0 0;
    slice b: true 1 0 0 0 0, predicted 1 1 1 0 0; slice c: 2 rows (under min_size 3)."""
    y_true = [1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    y_pred = [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    g = ["a"] * 4 + ["b"] * 5 + ["c"] * 2
    slices, fair = evaluate_slices(y_true, y_pred, ["neg", "pos"], {"g": g, "h": ["x"] * 11}, min_size=3)
    a, b = slices["g"]["a"], slices["g"]["b"]
    # a: neg P 2/3 R 1 F1 .8; pos P 1 R .5 F1 2/3.   b: neg P 1 R .5 F1 2/3; pos P 1/3 R 1 F1 .5
    assert a == pytest.approx({"accuracy": .75, "f1_macro": (.8 + 2 / 3) / 2, "precision_macro": (2 / 3 + 1) / 2,
                               "recall_macro": .75, "selection_rate": .25, "true_positive_rate": .5, "n": 4})
    assert b == pytest.approx({"accuracy": .6, "f1_macro": (2 / 3 + .5) / 2, "precision_macro": (1 + 1 / 3) / 2,
                               "recall_macro": .75, "selection_rate": .6, "true_positive_rate": 1.0, "n": 5})
    assert slices["g"]["c"] == {"n": 2, "too_small": "too small to judge (2 < eval.min_slice_size 3)"}
    f = fair["g"]
    assert f["judged"] == ["a", "b"] and f["too_small"] == ["c"] and f["positive_label"] == "pos"
    assert f["demographic_parity_difference"] == pytest.approx(.35)          # .6 - .25
    assert f["equal_opportunity_difference"] == pytest.approx(.5)            # 1 - .5
    assert f["gaps"]["accuracy"] == pytest.approx({"best_value": "a", "worst_value": "b", "best": .75, "worst": .6,
                                                   "difference": .15})
    assert f["gaps"]["recall_macro"]["difference"] == pytest.approx(0)
    assert "fewer than two slices" in fair["h"]["note"] and "gaps" not in fair["h"]
    col, metric, gap = largest_gap(fair)                                     # precision: 5/6 - 2/3 = 1/6 > .15
    assert (col, metric) == ("g", "precision_macro") and gap["difference"] == pytest.approx(1 / 6)


def test_multiclass_parity_is_the_largest_over_classes():
    # slice a predicts class 2 half the time, slice b never: class 2's selection-rate spread (.5) is the largest
    slices, fair = evaluate_slices([0, 1, 2, 2, 0, 1, 2, 2], [0, 1, 2, 2, 0, 1, 0, 1], ["x", "y", "z"],
                                   {"g": ["a"] * 4 + ["b"] * 4}, min_size=1)
    assert slices["g"]["a"]["selection_rate"] == {"x": .25, "y": .25, "z": .5}
    assert fair["g"]["demographic_parity_difference"] == pytest.approx(.5)
    assert fair["g"]["equal_opportunity_difference"] == pytest.approx(1.0)   # z: recall 1 in a, 0 in b


def test_eval_json_slices_from_a_trained_run(runs):
    """eval.json's slices agree with counting predictions.jsonl by the test rows' `source`."""
    ev = json.loads((runs.a / "eval.json").read_text())
    preds, rows = jsonl(runs.a / "predictions.jsonl"), jsonl(runs.a / "data" / "test.jsonl")
    by = {}
    for p, r in zip(preds, rows):
        by.setdefault(r["source"], []).append(p["predicted"] == p["label"])
    table = ev["slices"]["source"]
    assert set(table) == set(by) and {v: m["n"] for v, m in table.items()} == {v: len(x) for v, x in by.items()}
    for value, hits in by.items():
        if len(hits) >= 5:
            assert table[value]["accuracy"] == pytest.approx(sum(hits) / len(hits))
        else:
            assert "too small to judge" in table[value]["too_small"] and "accuracy" not in table[value]
    assert ev["fairness"]["source"]["judged"] == ["print", "web"]
    assert "slices" in ev["before"]                          # the model before fine-tuning is sliced alike


def test_slice_column_missing_is_a_recipe_mistake_before_training(tiny_bert, reviews, tmp_path):
    recipe = ts.load_recipe(recipe_dict(tiny_bert, reviews, eval={"slices": ["speaker"]}))
    with pytest.raises(ts.TunesmithError, match=r"eval.slices: no test row has column\(s\) \['speaker'\]"):
        ts.train(recipe, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_slices_are_a_key_of_classification_only():
    with pytest.raises(ts.RecipeError, match="eval.slices: does not apply to task 'causal-lm'"):
        ts.load_recipe({"task": "causal-lm", "model": "m", "data": {"train": "x.jsonl"}, "eval": {"slices": ["a"]}})


def test_cli_report_and_its_one_line_error(runs, tmp_path):
    from conftest import tunesmith

    out = tunesmith("report", runs.a, runs.b, "--out", tmp_path / "r.html", "--no-explain")
    assert out.returncode == 0, out.stderr[-2000:]
    html = (tmp_path / "r.html").read_text()
    assert "not computed (--no-explain)" in section(html, "explanations") and 'id="confusion-1"' in html
    bad = tunesmith("report", tmp_path / "nowhere", "--out", tmp_path / "x.html")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "is not a run folder" in bad.stderr
