"""tunesmith distill: the distillation loss (zero against itself, cross-entropy at alpha 0), and a half-depth
student initialised from the teacher, trained through the one pipeline on its soft labels, compared in distill.json.
A distilled run has what a trained run has, its lock released; `train --resume` continues it as a distillation
(the student's architecture, the same result), and says what to do when the teacher is gone."""
import json
import shutil

import pytest
import torch
from conftest import tunesmith
from deploy_fixtures import _RUNS, _train_text, text_run  # noqa: F401  (fixture)
from safetensors.torch import load_file

import tunesmith as ts
from tunesmith import safety
from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.tasks.text_classification import TextClassification


def test_distillation_loss_matches_its_definition(text_run):
    teacher = ts.Run(text_run).load("cpu")
    task, model = teacher.task, teacher.model
    assert task.distills
    rows = [{"text": "a great film", "label": "pos"}, {"text": "dull and weak", "label": "neg"}]
    features = task.encode(rows)
    with torch.no_grad():
        batch = task.collate(features)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for f, row in zip(features, task.teacher_outputs(model, features, 8)):
            f["teacher"] = row
        assert torch.allclose(torch.tensor([f["teacher"] for f in features]), logits, atol=1e-5)
        same = task.distillation(2.0, 1.0)
        assert float(same.loss(model, same.collate(features))) == pytest.approx(0.0, abs=1e-5)   # KL(p || p) = 0
        hard = task.distillation(2.0, 0.0)
        ce = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
        assert float(hard.loss(model, hard.collate(features))) == pytest.approx(float(ce), rel=1e-5)
        assert hard.count(hard.collate(features)) == 2.0
        for f in features:
            f["teacher"] = [0.0, 0.0]                      # uniform teacher: the soft loss is positive
        assert float(same.loss(model, same.collate(features))) > 0.01


def test_distill_reads_the_tasks_declaration(text_run, monkeypatch, tmp_path):
    monkeypatch.setattr(TextClassification, "distills", False)
    with pytest.raises(TunesmithError, match="cannot be distilled"):
        ts.distill(text_run, run_dir=tmp_path / "student")
    assert not (tmp_path / "student").exists()


@pytest.fixture(scope="module")
def distilled(tiny_bert, tmp_path_factory):
    """(teacher, student, the CLI's output): one distillation for this module; 9 optimizer steps per epoch, a
    checkpoint at the end of each, every one kept."""
    if "text" not in _RUNS:
        _RUNS["text"] = _train_text(tiny_bert, tmp_path_factory)
    teacher = _RUNS["text"]
    out = tmp_path_factory.mktemp("distill") / "student"
    r = tunesmith("distill", teacher, "--student", "half", "--run-dir", out, "train.epochs=3",
                  "train.keep_checkpoints=5")
    assert r.returncode == 0, r.stderr
    return teacher, out, r


def test_distill_half_depth_student(distilled):
    text_run, out, r = distilled
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


def test_distilled_run_has_what_a_trained_run_has(distilled):
    teacher, out, _ = distilled
    for name in ("run.json", "recipe.yaml", "metrics.jsonl", "eval.json", "distill.json", "predictions.jsonl",
                 "model/config.json", "model/model.safetensors", "data/test.jsonl", "data/validation.jsonl",
                 "data/splits.json", "checkpoints/best/COMMITTED", "checkpoints/step-00000027/COMMITTED"):
        assert (out / name).exists(), name
    assert not (out / safety.LOCK).exists()                               # released at the end
    made = json.loads((out / "run.json").read_text())["made_by"]
    assert made == {"command": "distill", "teacher": str(teacher.resolve()), "student": "half",
                    "temperature": 2.0, "alpha": 0.5}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "split" not in r] == list(range(1, 28))
    assert [r["step"] for r in records if r.get("split") == "validation"] == [9, 18, 27]
    assert all("accuracy" in r for r in records if r.get("split") == "validation")
    assert [r for r in records if r.get("summary")]
    splits = [json.loads((d / "data" / "splits.json").read_text())["fingerprint"] for d in (teacher, out)]
    assert splits[0] == splits[1]


def test_train_resume_of_a_finished_distillation_changes_nothing(distilled, tmp_path):
    _, out, _ = distilled
    run = tmp_path / "student"
    shutil.copytree(out, run)
    assert main(["train", "--resume", str(run)]) == 0
    assert not (run / safety.LOCK).exists()
    assert json.loads((run / "model" / "config.json").read_text())["num_hidden_layers"] == 1   # not the teacher's 2
    assert json.loads((run / "eval.json").read_text()) == json.loads((out / "eval.json").read_text())
    assert (run / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()
    assert json.loads((run / "run.json").read_text()) == json.loads((out / "run.json").read_text())


def test_interrupted_distillation_resumes_to_the_same_student(distilled, tmp_path):
    """As if killed after the checkpoint of step 18: no model/, no eval.json, later checkpoints and log lines
    left behind. `train --resume` recomputes the teacher's soft labels and ends bitwise where the whole run did."""
    _, out, _ = distilled
    run = tmp_path / "student"
    shutil.copytree(out, run)
    for name in ("model", "checkpoints/step-00000027"):
        shutil.rmtree(run / name)
    for name in ("eval.json", "distill.json", "predictions.jsonl"):
        (run / name).unlink()
    if json.loads((run / "checkpoints" / "best" / "state.json").read_text())["step"] > 18:
        shutil.rmtree(run / "checkpoints" / "best")                    # written after the kill
    assert main(["train", "--resume", str(run)]) == 0
    assert not (run / safety.LOCK).exists()
    for name in ("model/model.safetensors", "checkpoints/step-00000027/model.safetensors",
                 "checkpoints/step-00000027/optimizer.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((run / "eval.json").read_text()) == json.loads((out / "eval.json").read_text())
    assert json.loads((run / "distill.json").read_text())["student"]["copied_tensors"] > 0


def test_resume_without_the_teacher_says_what_to_do(distilled, tmp_path, capsys):
    _, out, _ = distilled
    run = tmp_path / "student"
    shutil.copytree(out, run)
    stamp = json.loads((run / "run.json").read_text())
    stamp["made_by"]["teacher"] = str(tmp_path / "gone")
    (run / "run.json").write_text(json.dumps(stamp))
    assert main(["train", "--resume", str(run)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"is a distillation of {tmp_path / 'gone'}, which is gone" in err and "put the teacher's run" in err
    assert "\n" not in err and not (run / safety.LOCK).exists()
