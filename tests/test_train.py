"""End to end on a tiny model: loss falls, accuracy beats chance, the run folder is complete and reloads."""
import json

import pytest
import yaml
from conftest import recipe_dict, tunesmith, write_reviews

from tunesmith.pipeline import train
from tunesmith.recipe import load

EVAL_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "per_class",
             "confusion_matrix", "n_examples"}


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    data = write_reviews(tmp / "reviews.csv", n=300)
    recipe = load(recipe_dict(tiny_bert, data, eval={"before": True}))
    return train(recipe, run_dir=tmp / "run")


def lines(run, name="metrics.jsonl"):
    return [json.loads(x) for x in (run.path / name).read_text().splitlines()]


def test_loss_falls_and_accuracy_beats_chance(trained):
    losses = [r["loss"] for r in lines(trained) if "loss" in r and "split" not in r]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    result = json.loads((trained.path / "eval.json").read_text())
    assert result["accuracy"] > 0.9 and result["n_examples"] == 60
    assert result["before"]["accuracy"] < result["accuracy"]


def test_run_folder_layout_and_eval_json(trained):
    p = trained.path
    for name in ("recipe.yaml", "metrics.jsonl", "eval.json", "model/config.json", "model/model.safetensors",
                 "data/test.jsonl", "data/validation.jsonl"):
        assert (p / name).exists(), name
    assert not list((p / "model").glob("*.bin")) and not list(p.rglob("*.pt"))
    result = json.loads((p / "eval.json").read_text())
    assert EVAL_KEYS <= set(result) and EVAL_KEYS <= set(result["before"])
    assert result["confusion_matrix"]["labels"] == ["neg", "pos"]
    assert sum(map(sum, result["confusion_matrix"]["matrix"])) == 60
    assert set(result["per_class"]) == {"neg", "pos"}
    assert yaml.safe_load((p / "recipe.yaml").read_text())["train"]["epochs"] == 10
    assert any(r.get("split") == "validation" and "accuracy" in r for r in lines(trained))


def test_pipeline_and_predict_agree(trained):
    from transformers import pipeline

    texts = ["the movie was superb", "a dull and clumsy plot", "the cast is lovely"]
    pipe = pipeline("text-classification", model=str(trained.path / "model"))
    expected = [r["label"] for r in pipe(texts)]
    out = tunesmith("predict", trained.path, *texts)
    assert out.returncode == 0, out.stderr
    got = [json.loads(x) for x in out.stdout.splitlines()]
    assert [g["label"] for g in got] == expected == ["pos", "neg", "pos"]
    assert all(abs(sum(g["probabilities"].values()) - 1) < 1e-4 for g in got)


def test_eval_command_matches_eval_json(trained, tmp_path):
    out = tunesmith("eval", trained.path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    saved = json.loads((trained.path / "eval.json").read_text())
    assert result["accuracy"] == pytest.approx(saved["accuracy"])
    other = write_reviews(tmp_path / "other.csv", n=40, seed=9)
    out = tunesmith("eval", trained.path, "--data", other)
    assert out.returncode == 0 and json.loads(out.stdout)["n_examples"] == 40


def test_predict_from_file(trained, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "great acting"}\n{"text": "terrible film"}\n')
    out = tunesmith("predict", trained.path, "--input", f)
    assert [json.loads(x)["label"] for x in out.stdout.splitlines()] == ["pos", "neg"]


def test_integer_labels_class_weights_and_smoothing(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "ints.csv", n=200, labels=(1, 0))
    recipe = load(recipe_dict(tiny_bert, data, train={"class_weights": "balanced", "label_smoothing": 0.1}))
    run = train(recipe, run_dir=tmp_path / "run")
    result = json.loads((run.path / "eval.json").read_text())
    assert result["confusion_matrix"]["labels"] == ["0", "1"] and result["accuracy"] > 0.85
    config = json.loads((run.path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}


def test_lora_run_saves_adapter_and_merged_model(tiny_bert, tmp_path):
    """LoRA trains (loss falls), leaves the base weights alone, and the merged model in model/ gives the
    same logits as base + adapter from model/adapter."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    data = write_reviews(tmp_path / "r.csv", n=200)
    targets = ["query", "key", "value", "dense"]
    recipe = load(recipe_dict(tiny_bert, data, adapt={"method": "lora", "lora": {"r": 8, "target_modules": targets}},
                              train={"learning_rate": 1e-2}))
    run = train(recipe, run_dir=tmp_path / "run")
    losses = [r["loss"] for r in lines(run) if "loss" in r and "split" not in r]
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:10]) / 10
    assert (run.path / "model" / "adapter" / "adapter_config.json").exists()

    base = load_file(str(tiny_bert / "model.safetensors"))
    merged = load_file(str(run.path / "model" / "model.safetensors"))
    assert torch.equal(base["bert.embeddings.word_embeddings.weight"], merged["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(base["bert.encoder.layer.0.attention.self.query.weight"],
                           merged["bert.encoder.layer.0.attention.self.query.weight"])

    tok = AutoTokenizer.from_pretrained(run.path / "model")
    batch = tok(["the movie was superb", "a dull plot"], padding=True, return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(run.path / "model").eval()
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    adapted = PeftModel.from_pretrained(fresh, run.path / "model" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-4)
    assert pipeline("text-classification", model=str(run.path / "model"))("superb")[0]["label"] in ("pos", "neg")


def test_bad_rows_fail_with_file_and_line(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=100)
    with open(data, "a") as f:
        f.write(',pos\nno label here,\n')
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_bert, data)))
    out = tunesmith("train", path, "--run-dir", tmp_path / "run")
    assert out.returncode == 1
    assert f"{data}:102: empty text" in out.stderr and f"{data}:103: missing label" in out.stderr
    assert "data.bad_rows=skip" in out.stderr


def test_two_process_ddp_through_accelerate(tiny_bert, tmp_path):
    """Distribution is torchrun's and accelerate's: two CPU processes (gloo) train one run into one folder.
    161 train rows in batches of 16: the last batch holds one example, so one process has none of it and must
    still join the gradient reduction (a stand-in that weighs nothing) instead of crashing or hanging."""
    import os
    import subprocess
    import sys

    recipe = recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=201))
    recipe["data"] |= {"validation_size": 20, "test_size": 20}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "-m", "tunesmith", "train", str(path), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})   # gloo on CPU even where GPUs exist
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x 2 processes" in out.stdout and out.stdout.count("after fine-tuning") == 1
    assert json.loads((tmp_path / "run" / "data" / "splits.json").read_text())["rows"]["train"] == 161
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["accuracy"] > 0.9


def test_early_stopping_keeps_the_best_and_stops(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=300)
    recipe = load(recipe_dict(tiny_bert, data, train={"epochs": 30, "eval_every": 6, "patience": 2,
                                                      "metric": "accuracy"}))
    run = train(recipe, run_dir=tmp_path / "run")
    evals = [r for r in lines(run) if r.get("split") == "validation"]
    assert evals[-1]["step"] < 30 * 12                        # stopped before the planned 360 steps
    best = max(e["accuracy"] for e in evals)
    first_best = next(e["step"] for e in evals if e["accuracy"] == best)
    assert [e["step"] > first_best and e["accuracy"] <= best for e in evals[-2:]] == [True, True]
    assert len(evals) == [e["step"] for e in evals].index(first_best) + 3   # exactly `patience` more evaluations
    state = json.loads((run.path / "checkpoints" / "best" / "state.json").read_text())
    assert state["accuracy"] == best and state["step"] == first_best


def test_pad_multiple_rounds_widths_but_not_past_max_length(tiny_bert, tmp_path):
    from tunesmith.tasks import get_task

    recipe = recipe_dict(tiny_bert, tmp_path / "x.csv")
    recipe["data"]["max_length"] = 20
    task = get_task(load(recipe))
    task.set_labels(["neg", "pos"])
    task.load_model()
    rows = [{"text": "good " * n} for n in (3, 7)]
    assert task.collate(task.encode(rows))["input_ids"].shape[1] == 9          # CPU default: no rounding
    task.pad_multiple = 16
    assert task.collate(task.encode(rows))["input_ids"].shape[1] == 16
    long = [{"text": "good " * 30}]                                           # cut at 20: 16 -> 32 capped at 20
    assert task.collate(task.encode(long))["input_ids"].shape[1] == 20


def test_explicit_epochs_are_trained_exactly_whatever_min_steps_says(tiny_bert, tmp_path, capsys):
    """60 train rows, batch 16: 4 steps per epoch. `epochs: 1` with train.min_steps=10 trains 4 steps, not 10 (a
    number of epochs means exactly that many; min_steps only keeps epochs: auto from stopping early), evaluated
    once; the run says it trained its epochs."""
    data = write_reviews(tmp_path / "r.csv", n=100)
    run = train(load(recipe_dict(tiny_bert, data, train={"epochs": 1, "min_steps": 10})), run_dir=tmp_path / "a")
    steps = [r["step"] for r in run.history if "loss" in r and "split" not in r]
    validations = [r for r in run.history if r.get("split") == "validation"]
    assert steps[-1] == 4 and len(validations) == 1
    assert all(r["examples_per_s"] > 0 for r in validations)           # evaluation speed beside training's
    out = capsys.readouterr().out
    assert "stopped: trained train.epochs=1 (4 steps)" in out and "epochs: auto" not in out
    assert run.training["ended"] == "stopped: trained train.epochs=1 (4 steps)" and run.training["steps"] == 4
    assert load(run.path / "recipe.yaml").train.epochs == 1


def test_fast_dropout_draws_the_training_masks_and_can_be_turned_off(tiny_bert, tmp_path, monkeypatch):
    """train.fast_dropout (default on, CPU): the training forward's dropout masks come from tunesmith.dropout,
    the same seed gives the same run; off, torch's dropout runs and the losses differ."""
    import tunesmith.dropout as dropout

    calls = []
    keep_mask = dropout.keep_mask
    monkeypatch.setattr(dropout, "keep_mask", lambda shape, p: calls.append(p) or keep_mask(shape, p))
    data = write_reviews(tmp_path / "r.csv", n=60)

    def losses(name, **train_cfg):
        run = train(load(recipe_dict(tiny_bert, data, train={"epochs": 1, **train_cfg})), run_dir=tmp_path / name)
        return [r["loss"] for r in run.history if "loss" in r and "split" not in r]

    on = losses("on")
    assert calls and set(calls) == {0.1}                       # the tiny BERT's dropout probabilities
    assert losses("again") == on                               # a pure function of the seed
    n = len(calls)
    off = losses("off", fast_dropout=False)
    assert len(calls) == n and off != on                       # torch's masks: no calls, other losses
