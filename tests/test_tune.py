"""tunesmith tune: prints its plan, races candidates by successive halving, spends what is left of the budget,
scores small data by K-fold, refits the choice on train + validation, covers causal-lm, and never runs past the
budget by more than one evaluation."""
import json
import re
import statistics
import time
from pathlib import Path

import pytest
from conftest import recipe_dict, tunesmith, write_reviews

import tunesmith as ts


def run_folders(run_dir) -> list[Path]:
    """A candidate's run folders: itself, or the folds of its cv folder (K-fold scoring)."""
    run_dir = Path(run_dir)
    return sorted(run_dir.glob("fold-*")) if (run_dir / "cv.json").exists() else [run_dir]


def test_tune_stays_within_its_budget(tiny_bert, tmp_path):
    from tunesmith.selection.tune import tune

    data = write_reviews(tmp_path / "r.csv", n=400)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 1000, "batch_size": 8}))
    lines = []
    t0 = time.monotonic()
    out = tune(recipe, tmp_path / "tune", "12s", say=lines.append)
    elapsed = time.monotonic() - t0
    text = "\n".join(lines)
    # 3 folds of 1000 epochs cannot fit: one validation split, and why
    assert lines[1].startswith("plan (one validation split: K folds do not fit the budget): plain recipe (1000 "
                               "epochs), then 5 x 1 epochs") and "estimated" in lines[1], text
    assert lines[2].startswith("scoring: validation accuracy on 80 rows (best checkpoint); not by 3-fold "
                               "cross-validation: the plain recipe's 3 folds"), text
    evals = []                                                # seconds of one validation, per run
    for row in out["runs"]:
        for folder in run_folders(row["run_dir"]):
            history = ts.Run(folder).history
            n = sum(r.get("split") == "validation" for r in history)
            evals += [r["eval_seconds"] / max(n, 1) for r in history if r.get("summary")]
    # the plain recipe (1000 epochs) cannot finish in 12 s: it is stopped after half the time left (the rest held
    # for its refit), after one evaluation; the refit then trains the epochs of its best checkpoint
    plain = out["runs"][0]
    assert plain["name"] == "plain" and plain["stopped"] == "time budget spent", text
    print(f"budget 12 s, spent {elapsed:.2f} s, one validation {max(evals):.3f} s; plain {plain['seconds']:.2f} s")
    assert plain["seconds"] <= 6 + max(evals) + 1, text
    assert out["final"] and out["model"] == out["final"]["run_dir"] and "best vs plain recipe" in text
    # the refit may run past the budget by at most its own estimate (tune.refit), + saving and the final test
    refit_s = float(re.search(r"refitting plain .* \(about (\d+)s\)", text).group(1))
    assert elapsed <= 12 + refit_s + max(evals) + 1.5, (elapsed, text)
    assert (tmp_path / "tune" / "tune.json").exists()


def test_tune_races_candidates_and_writes_best_yaml(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=120)
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_bert, data, train={"epochs": 1})))
    res = tunesmith("tune", path, "--budget", "25s", "--dir", tmp_path / "tune")
    assert res.returncode == 0, res.stderr
    assert "plan:" in res.stdout and "head-only" in res.stdout and "best vs plain recipe" in res.stdout
    assert "feature cache: on" in res.stdout                          # head-only trains on cached features
    assert ts.load_recipe(tmp_path / "tune" / "best.yaml").search is None


def test_a_failing_candidate_is_reported_and_the_race_goes_on(tiny_bert, tmp_path, monkeypatch):
    """A candidate that cannot run (here LoRA on modules the model lacks) is a failed row with its reason, not
    the end of tune; under K folds the first rung is a third of train.min_steps (40 train rows, batch 16: 3 steps
    per epoch, epochs auto with min_steps 30: plain 10 epochs, first rung ceil(10 / 3) = 4 epochs)."""
    import tunesmith.selection.tune as tune_mod

    def candidates(recipe, prof, lr):
        return [("broken", {"adapt.method": "lora", "adapt.lora.target_modules": ["no_such_module"],
                            "train.min_steps": 0}),
                ("head-only", {"adapt.method": "freeze", "adapt.freeze_backbone": True, "train.min_steps": 0})]

    monkeypatch.setattr(tune_mod, "candidates", candidates)
    monkeypatch.setattr(tune_mod.Race, "spend", lambda *a: 0)        # the plan alone
    data = write_reviews(tmp_path / "r.csv", n=66)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": "auto", "min_steps": 30}))
    lines = []
    out = tune_mod.tune(recipe, tmp_path / "tune", "120s", say=lines.append)
    text = "\n".join(lines)
    assert "plan: plain recipe (10 epochs), then 2 x 4 epochs" in text and "3-fold" in text, text
    assert "tune: broken failed: " in text and "No modules were targeted" in text, text   # peft's own reason
    broken = [r for r in out["runs"] if r["name"] == "broken"]
    assert broken and broken[0]["score"] is None and broken[0]["stopped"].startswith("failed: ")
    assert out["best"]["name"] in ("plain", "head-only") and out["final"]["rows"] == 53          # 40 + 13
    assert out["runs"][0]["trained"] == 10                            # the table shows what the plain run trained
    plain = ts.Run(run_folders(out["runs"][0]["run_dir"])[0]).history                  # a fold: 32 rows, 2 steps
    assert max(r["step"] for r in plain if "loss" in r and "split" not in r) == 20      # 10 epochs, not 1


def test_blocks_are_counted_as_freeze_layers_counts_them(tiny_bert):
    """tune names its 'top-2 of N' candidate from the model's repeated blocks: transformer layers, or the 16
    inverted-residual blocks of MobileNetV2, whose config has no num_hidden_layers."""
    from transformers import AutoConfig, MobileNetV2Config

    from tunesmith.selection.prepare import count_blocks

    assert count_blocks(AutoConfig.from_pretrained(tiny_bert), False) == 2
    assert not hasattr(MobileNetV2Config(), "num_hidden_layers")
    assert count_blocks(MobileNetV2Config(), False) == 16


def test_one_standard_error_rule_keeps_the_plain_recipe_within_noise():
    """On 40 validation rows an accuracy of 0.80 has a standard error of 0.063: a candidate at 0.825 does not
    replace the plain recipe, one at 0.875 does; metrics without a standard error pick the top score."""
    from tunesmith.selection.tune import choose

    plain = {"name": "plain", "score": 0.80, "n": 40}
    close, far = {"name": "close", "score": 0.825, "n": 40}, {"name": "far", "score": 0.875, "n": 40}
    best, margin = choose([plain, close], plain, "accuracy", "max")
    assert best is plain and abs(margin - (0.8 * 0.2 / 40) ** 0.5) < 1e-12
    assert choose([plain, close, far], plain, "accuracy", "max")[0] is far
    assert choose([plain, close], plain, "f1_macro", "max")[0] is close
    assert choose([{**plain, "score": None}, close], None, "accuracy", "max")[0] is close
    low = {"name": "low", "score": 0.5, "n": 40}
    assert choose([plain, low], plain, "loss", "min")[0] is low           # direction respected


def test_small_data_is_scored_by_k_fold_and_the_choice_refit_on_train_and_validation(tiny_bert, tmp_path,
                                                                                     monkeypatch):
    """90 rows: 54 train, 18 validation, 18 test. 72 rows of train + validation is below SMALL_ROWS, so every
    candidate's score is the mean of 3 held-out folds of those 72 rows (the test rows in none of them); the choice
    is then trained again on all 72 rows, keeping its last weights, and scored on the 18 test rows."""
    import tunesmith.selection.tune as tune_mod

    monkeypatch.setattr(tune_mod, "candidates", lambda recipe, prof, lr: [
        ("full lr 0.01", {"adapt.method": "full", "train.learning_rate": 1e-2})])
    monkeypatch.setattr(tune_mod.Race, "spend", lambda *a: 0)          # the plan alone: a short test
    data = write_reviews(tmp_path / "r.csv", n=90)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 3}))
    lines = []
    out = tune_mod.tune(recipe, tmp_path / "tune", "120s", say=lines.append)
    text = "\n".join(lines)
    assert lines[2].startswith("scoring: 3-fold cross-validation on train + validation (72 rows"), text
    assert out["scoring"] == {"folds": 3, "rows": 72}
    assert [r["name"] for r in out["runs"]] == ["plain", "full lr 0.01"]
    for row in out["runs"]:
        cv = json.loads((Path(row["run_dir"]) / "cv.json").read_text())
        assert cv["rows"] == 72 and len(cv["runs"]) == 3                         # the 18 test rows not pooled
        assert not (Path(row["run_dir"]) / "oof.jsonl").exists()                # scores only: no predictions
        assert row["folds"] == cv["metrics"]["accuracy"]["values"]
        assert row["score"] == pytest.approx(statistics.mean(row["folds"])) and row["n"] == 72
        held = 0
        for name, value in zip(cv["runs"], row["folds"]):
            assert ts.Run(Path(row["run_dir"]) / name).metrics["accuracy"] == value     # the held-out fold
            held += len((Path(row["run_dir"]) / "folds" / name / "test.jsonl").read_text().splitlines())
        assert held == 72                                     # every train + validation row held out once
    final = out["final"]
    assert final and final["rows"] == 72 and final["name"] == out["best"]["name"] and out["model"] == final["run_dir"]
    run = ts.Run(final["run_dir"])
    splits = json.loads((run.path / "data" / "splits.json").read_text())
    assert splits["rows"] == {"train": 72, "validation": 18, "test": 18}
    assert run.recipe.train.keep == "last" and not (run.checkpoints / "best").exists()    # the last weights
    assert run.metrics["accuracy"] == final["test"]
    assert "refit on train + validation (72 rows)" in text and "best vs plain recipe" in text
    assert ts.load_recipe(tmp_path / "tune" / "best.yaml").data.train == str(data)          # the user's data


def test_spending_the_budget_runs_more_epochs_rates_and_seeds(tiny_bert, tmp_path, monkeypatch):
    """When the planned race ends early, tune keeps going: more epochs for a leader still improving, learning
    rates around the best, more seeds; it uses most of the budget and overruns it by less than one run. Runs are
    faked (a sleep as long as the probe's numbers predict), so the test is about the schedule alone."""
    import math

    from tunesmith.selection import race as race_mod

    def fake(recipe, run_dir, folds, callbacks, metric, direction, until=None):
        e, lr = recipe.train.epochs, recipe.train.learning_rate
        time.sleep(0.1 + 0.1 * e)                                 # what Timing below predicts
        score = 0.6 + 0.02 * min(e, 6) - 0.05 * abs(math.log10(lr / 3e-3)) + 0.001 * recipe.train.seed
        return {"score": score, "folds": None, "n": 100, "test": score, "stopped": None, "best_epochs": float(e),
                "trained": float(e)}

    monkeypatch.setattr(race_mod, "run_candidate", fake)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, tmp_path / "r.csv", train={"epochs": 1, "learning_rate": 3e-3}))
    budget, lines = 8.0, []
    start = time.monotonic()
    race = race_mod.Race(recipe, tmp_path, start + budget, [], race_mod.Timing(0.02, 0.1, 10), rows=50,
                         refit_rows=60, folds=None, base_lr=3e-3, say=lines.append)
    race.attempt("plain", {}, None)                               # the plan: 1.4 s of the 8 s
    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        race.attempt(name, {"train.learning_rate": lr}, 1)
    race.attempt("b", {"train.learning_rate": 3e-3}, 3)
    planned = len(race.results)
    extra = race.spend(top_epochs=3)
    elapsed = time.monotonic() - start
    runs = race.results[planned:]
    assert extra == len(runs) >= 4
    assert any(r["name"] == "b" and r["epochs"] == 9 for r in runs)                 # more epochs, still improving
    assert any(r["name"] == "b lr 0.009" for r in runs) and any(r["name"] == "b lr 0.001" for r in runs)
    assert any(r["seed"] != recipe.train.seed for r in runs)                        # more seeds
    longest = max(r["seconds"] for r in race.results)
    # the refit reserve is what the refit then uses: together they spend >= 80% of the budget
    print(f"budget {budget} s: spent {elapsed:.2f} s + refit reserve {race.reserve():.2f} s; longest run {longest:.2f}")
    assert elapsed + race.reserve() >= 0.8 * budget
    assert elapsed <= budget + longest


def test_causal_lm_tune_races_lora_ranks_and_rates_on_generated_answers(tmp_path, monkeypatch):
    """causal-lm declares its own space (LoRA rank x rate, CausalLMRecipe.search_space) and, with eval.generate,
    scores candidates on the exact match of answers generated for the validation rows."""
    from test_causal_lm import build_tiny_llama, lm_recipe, write_chats

    import tunesmith.selection.tune as tune_mod

    monkeypatch.setattr(tune_mod, "SMALL_ROWS", 0)                # one validation split: one run a candidate
    monkeypatch.setattr(tune_mod.Race, "spend", lambda *a: 0)
    model = build_tiny_llama(tmp_path / "llama")
    recipe = ts.load_recipe(lm_recipe(model, write_chats(tmp_path / "chats.jsonl", n=80), train={"epochs": 1}))
    assert recipe.tune_metric() == ("exact_match", "max")
    assert ts.load_recipe(lm_recipe(model, tmp_path / "x.jsonl", eval={"generate": None})).tune_metric() == \
        ("loss", "min")
    lines = []
    out = tune_mod.tune(recipe, tmp_path / "tune", "300s", say=lines.append)
    text = "\n".join(lines)
    assert out["metric"] == "exact_match" and "scoring: validation exact_match on 8 rows" in text, text
    names = [r["name"] for r in out["runs"]]
    space = [n for n, _ in recipe.search_space(None, 1e-2)]
    assert names[0] == "plain" and names[1:5] == space and {n.split(" lr")[0] for n in space} == {"lora r8", "lora r32"}
    for row in out["runs"][1:]:
        ran = ts.Run(row["run_dir"]).recipe
        assert ran.adapt.method == "lora" and ran.adapt.lora.r == row["values"]["adapt.lora.r"]
        assert ran.train.learning_rate == row["values"]["train.learning_rate"] and 0 <= row["score"] <= 1
    row = out["runs"][-1]                                         # its score: generated answers on validation
    run = ts.Run(row["run_dir"])
    assert run.load().evaluate(run.path / "data" / "validation.jsonl")["exact_match"] == row["score"]
    best, final = out["best"], out["final"]
    assert best["name"] in ["plain", *space] and final["rows"] == 68             # 60 train + 8 validation
    assert ts.Run(final["run_dir"]).recipe.adapt.lora.r == best["values"].get("adapt.lora.r", 8)
    assert final["test"] is not None and "best vs plain recipe: exact_match" in text


def test_k_fold_scoring_is_chosen_by_size_and_falls_back_when_folds_cannot_be_cut(tmp_path):
    """Below SMALL_ROWS rows of train + validation: 3 folds; at or above: the validation split; search.cv sets the
    folds at any size; a class with fewer rows than folds: the validation split, and why."""
    from types import SimpleNamespace

    from tunesmith.selection.tune import SMALL_ROWS, scoring

    task = SimpleNamespace(stratify_key=lambda r: r["label"])

    def tables(n, rare=0):
        rows = [{"text": "x", "label": "a" if i % 2 else "b"} for i in range(n - rare)] + [{"label": "c"}] * rare
        cut = n * 3 // 4
        return {"train": SimpleNamespace(rows=rows[:cut]), "validation": SimpleNamespace(rows=rows[cut:])}

    recipe = ts.load_recipe(recipe_dict(tmp_path, tmp_path / "r.csv"))
    lines = []
    assert scoring(recipe, task, tables(SMALL_ROWS - 1), lines.append) == 3
    assert scoring(recipe, task, tables(SMALL_ROWS), lines.append) is None
    five = ts.load_recipe({**recipe_dict(tmp_path, tmp_path / "r.csv"), "search": {"cv": 5}})
    assert scoring(five, task, tables(SMALL_ROWS), lines.append) == 5
    assert scoring(recipe, task, tables(100, rare=2), lines.append) is None and not lines[:-1]
    assert lines[-1].startswith("tune: scoring on the validation split, not by 3-fold cross-validation: ")
