"""The HTML run report (tunesmith.report) and the tracking callbacks (tunesmith.tracking) on tiny real runs.

Two tiny text-classification runs are trained once per module (different learning rates, a few seconds each);
run A also gets predictions.jsonl (from the trained model through a plain transformers pipeline) and a
doctor.json, run B has neither.
"""
import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import recipe_dict, write_reviews

pytest.importorskip("matplotlib", reason="the report needs matplotlib: pip install 'tunesmith[report]'")

from tunesmith.report import NO_PREDICTIONS, reliability, write_report

SECTIONS = ["overview", "curves", "confusion", "per-class", "reliability", "before-after", "doctor", "samples",
            "recipe-diff"]
IMG = re.compile(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
DOCTOR = {"version": 1, "status": "warnings", "blocking": [],
          "warnings": ["train: 3 exact duplicate rows (a dedup would drop them)"]}


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.DOTALL)
    assert m, f"no section {sid}"
    return m.group(1)


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):
    from transformers import pipeline

    from tunesmith.recipe import load
    from tunesmith.train import train

    tmp = tmp_path_factory.mktemp("report")
    data = write_reviews(tmp / "reviews.csv", n=240)
    a = train(load(recipe_dict(tiny_bert, data, eval={"before": True}, train={"epochs": 10})), run_dir=tmp / "a").path
    b = train(load(recipe_dict(tiny_bert, data, train={"epochs": 6, "learning_rate": 1e-3})), run_dir=tmp / "b").path
    rows = [json.loads(x) for x in (a / "data" / "test.jsonl").read_text().splitlines()]
    pipe = pipeline("text-classification", model=str(a / "model"), top_k=None)
    with open(a / "predictions.jsonl", "w") as f:
        f.writelines(json.dumps({"label": row["label"], "probabilities": {o["label"]: o["score"] for o in out}}) + "\n" for row, out in zip(rows, pipe([r["text"] for r in rows])))
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


def test_reliability_from_predictions_matches_eval_json_ece(runs, report_a):
    """The report's ECE, recomputed from predictions.jsonl, equals the ECE the trainer wrote to eval.json."""
    preds = [json.loads(x) for x in (runs.a / "predictions.jsonl").read_text().splitlines()]
    rel = reliability(preds)
    ece = json.loads((runs.a / "eval.json").read_text())["ece"]
    assert rel["n"] == len(preds) == 48 and sum(b["count"] for b in rel["bins"]) == 48
    assert rel["ece"] == pytest.approx(ece, abs=1e-4)
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
    assert set(keys) == {"train.learning_rate", "train.epochs", "eval.before"}, keys
    assert "0.003" in diff and "0.001" in diff
    assert "#1f77b4" in diff and "#ff7f0e" in diff                  # each run's colour swatch


def test_chat_run_shows_sample_generations(tmp_path):
    """A causal-LM run folder (written by hand: format of CausalLM.evaluate_final) shows its samples."""
    run = tmp_path / "chat"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"task": "causal-lm", "model": {"name": "tiny-gpt"},
                                                     "train": {"metric": None}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "epoch": 0.5, "loss": 3.0, "lr": 1e-3, "samples_per_s": 10.0, "tokens_per_s": 900.0},
        {"step": 2, "epoch": 1.0, "loss": 2.5, "lr": 5e-4, "samples_per_s": 11.0, "tokens_per_s": 950.0},
        {"step": 2, "epoch": 1, "split": "validation", "loss": 2.7, "perplexity": 14.9},
        {"step": 2, "summary": True, "train_seconds": 1.5}]))
    (run / "eval.json").write_text(json.dumps({"loss": 2.6, "perplexity": 13.5, "exact_match": 0.25,
                                               "rouge_l": 0.5}))
    (run / "samples.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 2 + <b>2</b>?"}],
                                                   "reference": "4", "output": "four"}) + "\n")
    html = write_report([run], tmp_path / "chat.html").read_text()
    samples = section(html, "samples")
    assert "user: What is 2 + &lt;b&gt;2&lt;/b&gt;?" in samples and "<td class=\"l\"><pre>four</pre></td>" in samples
    assert "not a classification run" in section(html, "confusion")
    assert "<td>0.5000</td>" in section(html, "overview")            # rouge_l among the test metrics
    assert len(IMG.findall(section(html, "curves"))) == 1


def test_missing_matplotlib_names_the_extra(runs, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'tunesmith\[report\]'"):
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
    assert probe and "images=3 broken=0 sections=9" in probe[0], (probe, stderr[-2000:])
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

def test_tracking_callbacks_read_back_exactly(runs, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'tunesmith[tracking]'")
    pytest.importorskip("mlflow", reason="pip install 'tunesmith[tracking]'")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from tunesmith.tracking import MLflow, TensorBoard

    run = tmp_path / "run"                          # a copy: the callbacks write into the run folder
    run.mkdir()
    for name in ("recipe.yaml", "metrics.jsonl", "eval.json"):
        shutil.copy(runs.a / name, run / name)
    recs = records(run)
    tb, ml = TensorBoard(run), MLflow(run)
    for r in recs:                                  # what the training loop will do, in order
        tb.on_log(r)
        ml.on_log(r)
    tb.on_end(SimpleNamespace(path=run))
    ml.on_end(SimpleNamespace(path=run))

    expected = {}                                   # tag -> [(step, value)] straight from metrics.jsonl
    for r in recs:
        prefix = "summary" if r.get("summary") else r.get("split", "train")
        for k, v in r.items():
            if k not in ("step", "split", "summary") and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(f"{prefix}/{k}", []).append((r["step"], v))
    assert {"train/loss", "train/lr", "train/samples_per_s", "validation/accuracy", "summary/train_seconds"} <= set(
        expected)
    ev = json.loads((run / "eval.json").read_text())
    last = max(r["step"] for r in recs)

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    for tag, want in expected.items():
        got = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
        assert got == want, tag
    assert [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors("test/accuracy")] == [
        (last, ev["accuracy"])]
    assert acc.Tensors("test/per_class/pos/f1")[0].step == last
    text = tensor_util.make_ndarray(acc.Tensors("recipe/text_summary")[0].tensor_proto).item().decode()
    assert "learning_rate: 0.003" in text

    client = MlflowClient(ml.tracking_uri)
    assert ml.tracking_uri == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    for tag, want in expected.items():
        got = [(m.step, m.value) for m in sorted(client.get_metric_history(ml.run_id, tag), key=lambda m: m.step)]
        assert got == want, tag
    info = client.get_run(ml.run_id)
    assert info.info.status == "FINISHED"
    assert info.data.metrics["test/accuracy"] == ev["accuracy"]
    assert info.data.metrics["test/before/loss"] == ev["before"]["loss"]
    assert info.data.params["train.learning_rate"] == "0.003" and info.data.params["task"] == "text-classification"
    assert {f.path for f in client.list_artifacts(ml.run_id)} == {"recipe.yaml", "eval.json"}
    assert (run / "mlartifacts").is_dir() and not (Path.cwd() / "mlruns").exists()
