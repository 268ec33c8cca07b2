"""tunesmith export: ONNX fp32 and int8 checked against the PyTorch model and eval.json on the run's test rows,
the --max-drop gate, and causal-lm runs (HF folder only)."""
import json
import shutil

import pytest
from conftest import tunesmith
from deploy_fixtures import chat_run, image_run, text_run  # noqa: F401  (fixtures)

import tunesmith as ts


def test_export_fp32_and_int8_match_the_run(text_run, tmp_path):
    out = tmp_path / "export"
    report = ts.export(text_run, quantize="int8", out=out, repeats=5)
    assert report["passed"] and report["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    fp32, int8 = report["results"]["fp32"], report["results"]["int8"]
    assert fp32["max_abs_logit_diff"] < 1e-4                       # the same function, up to float rounding
    assert fp32["accuracy"] == pytest.approx(ts.Run(text_run).metrics["accuracy"], abs=1e-9)
    assert 0 < int8["max_abs_logit_diff"] < 0.5                     # quantized: close, not equal
    assert abs(int8["drop"]) <= 0.01
    assert int8["size_mb"] < fp32["size_mb"]
    for r in (fp32, int8):
        assert r["batch1"]["p50_ms"] <= r["batch1"]["p95_ms"] and r["batch32"]["calls"] >= 3
    written = json.loads((out / "export.json").read_text())
    assert written["files"] == report["files"] and (out / "config.json").exists()
    # the exported file predicts what the run predicts, through the task's own predict
    texts = ["a great and lovely film", "dull boring plot"]
    from tunesmith.deploy.export import load_onnx

    shutil.copytree(out, text_run / "export", dirs_exist_ok=True)
    a, b = ts.Run(text_run).load("cpu").predict(texts), load_onnx(text_run, "fp32").predict(texts)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert all(abs(a[i]["probabilities"][k] - b[i]["probabilities"][k]) < 1e-4 for i in range(2) for k in a[i]
               ["probabilities"])


def test_export_gate_fails_when_the_metric_drops(text_run, tmp_path):
    """eval.json claiming 5 points more than the model scores: the export is rejected, exit 1, no file left."""
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    shutil.rmtree(run / "export", ignore_errors=True)
    metrics = json.loads((run / "eval.json").read_text())
    metrics["accuracy"] += 0.05
    (run / "eval.json").write_text(json.dumps(metrics))
    r = tunesmith("export", run, "--format", "onnx")
    assert r.returncode == 1, r.stderr
    assert "REJECTED fp32" in r.stdout and "max |logit diff|" in r.stdout
    assert not (run / "export" / "model.onnx").exists() and not (run / "export" / "export.json").exists()
    report = ts.export(run, max_drop=0.06, repeats=3)                 # within a looser gate: passes
    assert report["passed"] and (run / "export" / "export.json").exists()


def test_causal_lm_exports_its_merged_folder_not_onnx(chat_run, tmp_path):
    with pytest.raises(ts.TunesmithError, match="causal-lm.*--format hf"):
        ts.export(chat_run, format="onnx")
    report = ts.export(chat_run, format="hf", out=tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(report["out"]).config.num_hidden_layers == 2


def test_image_classifier_exports_with_parity(image_run, tmp_path):
    report = ts.export(image_run, quantize="int8", out=tmp_path / "export", max_drop=1.0, repeats=3)
    fp32 = report["results"]["fp32"]
    assert report["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert fp32["max_abs_logit_diff"] < 1e-4
    assert fp32["accuracy"] == pytest.approx(ts.Run(image_run).metrics["accuracy"], abs=1e-9)
    assert (tmp_path / "export" / "preprocessor_config.json").exists()
