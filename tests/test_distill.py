"""tunesmith distill: the distillation loss (zero against itself, cross-entropy at alpha 0), and a half-depth
student initialised from the teacher, trained by the loop on its soft labels, compared in distill.json."""
import json

import pytest
import torch
from conftest import tunesmith
from deploy_fixtures import text_run  # noqa: F401  (fixture)

import tunesmith as ts
from tunesmith.deploy.distill import Distillation


def test_distillation_loss_matches_its_definition(text_run):
    teacher = ts.Run(text_run).load("cpu")
    task, model = teacher.task, teacher.model
    rows = [{"text": "a great film", "label": "pos"}, {"text": "dull and weak", "label": "neg"}]
    features = task.encode(rows)
    with torch.no_grad():
        batch = task.collate(features)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for f, row in zip(features, logits.tolist()):
            f["teacher"] = row
        same = Distillation(task, 2.0, 1.0)
        assert float(same.loss(model, same.collate(features))) == pytest.approx(0.0, abs=1e-5)   # KL(p || p) = 0
        hard = Distillation(task, 2.0, 0.0)
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        assert float(hard.loss(model, hard.collate(features))) == pytest.approx(float(ce), rel=1e-5)
        for f in features:
            f["teacher"] = [0.0, 0.0]                      # uniform teacher: the soft loss is positive
        assert float(same.loss(model, same.collate(features))) > 0.01


def test_distill_half_depth_student(text_run, tmp_path):
    out = tmp_path / "student"
    r = tunesmith("distill", text_run, "--student", "half", "--run-dir", out, "train.epochs=3")
    assert r.returncode == 0, r.stderr
    assert "teacher" in r.stdout and "student" in r.stdout and "accuracy (test)" in r.stdout
    report = json.loads((out / "distill.json").read_text())
    teacher, student = report["teacher"], report["student"]
    model = ts.Run(out).load("cpu")
    assert model.model.config.num_hidden_layers == 1                      # the teacher has 2
    assert student["copied_tensors"] == len(model.model.state_dict())     # every tensor started from the teacher
    assert student["parameters"] < teacher["parameters"] and student["size_mb"] < teacher["size_mb"]
    assert student["accuracy"] >= teacher["accuracy"] - 0.1 and student["accuracy"] > 0.8
    assert json.loads((out / "eval.json").read_text())["accuracy"] == student["accuracy"]
    assert (out / "data" / "test.jsonl").read_text() == (text_run / "data" / "test.jsonl").read_text()
    assert model.predict("a great and lovely film")["label"] in ("pos", "neg")
