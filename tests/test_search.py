"""tunesmith search: trials are run folders, pruning stops weak trials, best.yaml trains the best trial again
exactly, a killed study resumes (its dead trial failed and retried), and the space is checked before any trial."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import recipe_dict, tunesmith, write_reviews

import tunesmith as ts

pytest.importorskip("optuna")


def search_recipe(tiny_bert, data, **search):
    return recipe_dict(tiny_bert, data, train={"epochs": 4, "log_every": 5, "metric": "loss"},
                       search={"space": {"train.learning_rate": {"choices": [1e-6, 3e-3]},
                                         "train.batch_size": {"choices": [8, 16]}}, **search})


def validations(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"validation"' in x]


def test_callback_stop_training_ends_the_run_cleanly(tiny_bert, tmp_path):
    class StopAtFirst(ts.Callback):
        def on_log(self, record):
            if record.get("split") == "validation":
                raise ts.StopTraining("enough")

    recipe = ts.load_recipe(recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=120)))
    run = ts.train(recipe, tmp_path / "run", callbacks=[StopAtFirst()])
    assert len([r for r in run.history if r.get("split") == "validation"]) == 1   # 10 epochs asked
    assert run.history[-1]["stopped"] == "enough"
    assert "accuracy" in run.metrics                                             # finished: eval.json


def test_search_prunes_and_best_yaml_reproduces_the_best_trial(tiny_bert, tmp_path):
    from tunesmith.selection.search import search

    data = write_reviews(tmp_path / "r.csv", n=160)
    recipe = ts.load_recipe(search_recipe(tiny_bert, data, trials=6, pruner="halving"))
    out = search(recipe, tmp_path / "study")
    states = [t["state"] for t in out["trials"]]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6 and "COMPLETE" in states
    for t in out["trials"]:                                   # each trial is its own run folder
        history = validations(tmp_path / "study" / t["run_dir"])
        assert len(history) == (4 if t["state"] == "COMPLETE" else len(history))
        if t["state"] == "PRUNED":
            assert len(history) < 4                           # stopped early by StopTraining
    assert "PRUNED" in states, states
    best = out["best"]
    assert best["score"] == min(t["score"] for t in out["trials"] if t["state"] == "COMPLETE")   # loss: lower
    assert best["score"] == min(r["loss"] for r in validations(tmp_path / "study" / best["run_dir"].split("/")[-1]))
    again = tmp_path / "again"
    res = tunesmith("train", tmp_path / "study" / "best.yaml", "--run-dir", again)
    assert res.returncode == 0, res.stderr
    trial_eval = json.loads((tmp_path / "study" / f"trial-{best['number']:04d}" / "eval.json").read_text())
    assert json.loads((again / "eval.json").read_text()) == trial_eval
    assert min(r["loss"] for r in validations(again)) == best["score"]


def test_interrupted_search_resumes_and_retries_the_interrupted_trial(tiny_bert, tmp_path):
    """Ctrl-C (SIGINT) mid trial: the trial is failed and queued again; the same command resumes the study.
    (A SIGKILLed worker's trial is failed by the heartbeat: tests/test_search_postgres.py.)"""
    data = write_reviews(tmp_path / "r.csv", n=100)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(search_recipe(tiny_bert, data, trials=2, pruner="none", heartbeat=1)))
    study = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "search", str(path), "--dir", str(study)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((study / "trial-0001" / "metrics.jsonl").exists()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)                          # Ctrl-C mid trial 1
    _, err = proc.communicate(timeout=60)
    # exit 130 and one line saying how to resume; no traceback (optuna logged the KeyboardInterrupt's, issue 20)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: the trial that was running will run again")
    res = tunesmith("search", path, "--dir", study)
    assert res.returncode == 0, res.stderr
    trials = {t["number"]: t for t in json.loads((study / "trials.json").read_text())["trials"]}
    assert trials[1]["state"] == "FAIL"
    retry = [t for t in trials.values() if t["number"] > 1 and t["params"] == trials[1]["params"]]
    assert retry and retry[0]["state"] == "COMPLETE"
    # the retry continued the interrupted trial's own run folder from its checkpoint, each step once
    assert retry[0]["run_dir"] == "trial-0001" and "continuing trial-0001" in res.stdout
    steps = [r["step"] for r in validations(study / "trial-0001")]
    assert steps == sorted(set(steps)) and len(steps) == 4
    assert trials[0]["state"] == "COMPLETE"                   # finished before the kill: kept, not rerun
    assert sum(t["state"] == "COMPLETE" for t in trials.values()) == 2


def test_space_is_checked_before_any_trial(tiny_bert, tmp_path):
    from tunesmith.selection.search import search

    data = write_reviews(tmp_path / "r.csv", n=60)
    bad = recipe_dict(tiny_bert, data, search={"space": {"train.lerning_rate": {"low": 1e-4, "high": 1e-2},
                                                         "train.batch_size": {"choices": [0, 8]}}})
    with pytest.raises(ts.RecipeError) as e:
        search(ts.load_recipe(bad), tmp_path / "study")
    text = str(e.value)
    assert "lerning_rate" in text and "did you mean 'train.learning_rate'" in text and "batch_size" in text
    assert not (tmp_path / "study" / "trial-0000").exists()
    with pytest.raises(ts.RecipeError, match="low 5 is above high 1"):
        ts.load_recipe(recipe_dict(tiny_bert, data, search={"space": {"train.epochs": {"low": 5, "high": 1}}}))


def test_default_space_follows_the_task_and_method(tiny_bert, tmp_path):
    from tunesmith.selection.space import default_space

    data = tmp_path / "r.csv"
    text = default_space(ts.load_recipe(recipe_dict(tiny_bert, data)))
    assert {"train.learning_rate", "train.label_smoothing", "adapt.freeze_layers"} <= set(text)
    lora = default_space(ts.load_recipe(recipe_dict(tiny_bert, data, adapt={"method": "lora"})))
    assert {"adapt.lora.r", "adapt.lora.alpha"} <= set(lora) and "adapt.freeze_layers" not in lora
    chat = default_space(ts.load_recipe({"task": "causal-lm", "model": "x", "data": {"train": "c.jsonl"}}))
    assert "train.label_smoothing" not in chat and "adapt.lora.r" in chat


def test_search_scores_trials_by_cross_validation(tiny_bert, tmp_path):
    from tunesmith.selection.search import search

    data = write_reviews(tmp_path / "r.csv", n=60)
    recipe = ts.load_recipe(search_recipe(tiny_bert, data, trials=1, cv=2))
    out = search(recipe, tmp_path / "study")
    cv = json.loads((tmp_path / "study" / "trial-0000" / "cv.json").read_text())
    assert out["best"]["score"] == cv["metrics"]["loss"]["mean"] and len(cv["runs"]) == 2
    assert ts.load_recipe(tmp_path / "study" / "best.yaml").train.metric == "loss"


def test_sampled_epochs_are_what_a_trial_trains(tiny_bert, tmp_path):
    """train.min_steps (100 here) must not raise a sampled epoch count: 60 train rows, batch 16, 4 steps per epoch,
    so a trial of 1 or 2 epochs trains 4 or 8 steps, and its recipe.yaml (best.yaml) says min_steps 0."""
    from tunesmith.selection.search import search

    data = write_reviews(tmp_path / "r.csv", n=100)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"min_steps": 100},
                                        search={"trials": 2, "pruner": "none",
                                                "space": {"train.epochs": {"low": 1, "high": 2}}}))
    search(recipe, tmp_path / "study", say=lambda *a: None)
    trials = sorted((tmp_path / "study").glob("trial-*"))
    assert len(trials) == 2
    for t in trials:
        trained = ts.Run(t).recipe
        steps = max(r["step"] for r in ts.Run(t).history if "loss" in r and "split" not in r)
        assert trained.train.min_steps == 0 and steps == 4 * trained.train.epochs, (trained.train.epochs, steps)
