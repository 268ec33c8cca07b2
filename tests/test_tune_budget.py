"""tune within a small budget: K folds only where they fit, the refit's time kept from the first run on, every run
of a causal-lm tune on one split trained to its own plateau (epochs: auto), a final model that is never an
untrained one, LoRA proposed only where the model has LoRA targets, and an honest message when not even the plain
recipe fits."""
import math
import time
from pathlib import Path

import pytest
from conftest import recipe_dict, write_reviews

import tunesmith as ts


def test_lora_is_proposed_only_where_the_model_has_lora_targets(tiny_bert, tmp_path):
    """PEFT has default LoRA targets for transformer architectures, none for a conv net (MobileNetV2: "Please
    specify `target_modules`"); the recipe's own target_modules always count. Candidates follow the profile."""
    from tunesmith.adapt import lora_targets
    from tunesmith.selection.tune import candidates

    assert lora_targets("bert", None) and lora_targets("llama", None)
    assert not lora_targets("mobilenet_v2", None) and lora_targets("mobilenet_v2", ["conv"])
    recipe = ts.load_recipe(recipe_dict(tiny_bert, tmp_path / "r.csv"))
    names = [n for n, _ in candidates(recipe, {"blocks": 16, "lora": True}, 1e-3)]
    assert "lora r16" in names
    without = candidates(recipe, {"blocks": 16, "lora": False}, 1e-3)
    assert [n for n, _ in without] == [n for n in names if n != "lora r16"]
    assert all(v["adapt.method"] != "lora" for _, v in without)


def race_for(recipe, tmp_path, step_s: float, overhead_s: float, budget: float = 600.0):
    from tunesmith.selection.race import Race, Timing

    return Race(recipe, tmp_path, time.monotonic() + budget, [], Timing(step_s, overhead_s, 8), rows=192,
                refit_rows=216, folds=3, base_lr=2e-4, say=lambda *a: None)


def test_k_fold_scoring_gives_way_to_one_split_when_it_does_not_fit_the_budget(tiny_bert, tmp_path):
    """Chat-sized runs (0.5 s a step, 20 s a run's fixed costs, 192 rows at batch 8): the plain recipe's 3 folds,
    its refit and its own run take about 257 s, more than a third of a 600 s budget: one validation split, and the
    budget that would allow folds. Text-sized runs (0.01 s a step): folds kept."""
    from tunesmith.selection.tune import FOLD_SHARE, folds_fit

    recipe = ts.load_recipe(recipe_dict(tiny_bert, tmp_path / "r.csv"))
    race = race_for(recipe, tmp_path, 0.5, 20.0)
    folds, why = folds_fit(race, 3, setup=30.0)
    assert folds is None and race.folds is None
    need = 3 * (20 + 3 * 17 * 0.5) + 2 * (20 + 3 * 27 * 0.5)                # 17 steps a fold's epoch, 27 refit
    assert f"would take about {need:.0f}s of the " in why and f"a budget of {math.ceil(30 + need / FOLD_SHARE)}s" in why
    fast = race_for(recipe, tmp_path, 0.01, 2.0)
    assert folds_fit(fast, 3, setup=5.0) == (3, "") and fast.folds == 3


def test_every_run_stops_early_enough_to_leave_the_refit_its_time(tiny_bert, tmp_path, monkeypatch):
    """A candidate's run ends at the budget less the refit of the best so far (it ran to the budget itself, and
    on one chat fold no time was left to refit: tune delivered an untrained baseline)."""
    from tunesmith.selection import race as race_mod

    seen = []

    def fake(recipe, run_dir, folds, callbacks, metric, direction, until=None):
        seen.append((until, [c.deadline for c in callbacks if isinstance(c, race_mod.Deadline)]))
        return {"score": 0.8, "folds": None, "n": 24, "test": 0.8, "stopped": None, "best_epochs": 5.0,
                "trained": 7.0}

    monkeypatch.setattr(race_mod, "run_candidate", fake)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, tmp_path / "r.csv"))
    race = race_for(recipe, tmp_path, 0.5, 20.0)
    race.folds = None
    race.attempt("plain", {}, None, reserve=100.0)
    assert seen[-1][0] == pytest.approx(race.deadline - 100.0) and seen[-1][1] == [seen[-1][0]]
    race.ratios.clear()                                       # the fake took no time: the probe's estimates
    reserve = race.reserve()                                  # the refit of plain: 5 epochs of 27 steps, 216 rows
    assert reserve == pytest.approx(20 + 5 * 27 * 0.5)
    race.attempt("lora r8 lr 0.0006", {"train.learning_rate": 6e-4}, None, limit=50.0)
    until, deadlines = seen[-1]
    assert until <= race.deadline - reserve + 1e-6 and until <= time.monotonic() + 50.0
    assert deadlines == [until]


def test_evaluations_are_timed_apart_from_steps(tiny_bert, tmp_path, monkeypatch):
    """Under epochs: auto a chat run evaluates (generates answers) 4 times an epoch, a refit once: estimates
    count steps at the measured step ratio and evaluations at the measured seconds of one, so the refit's
    reserve is not inflated by the plain run's 30 generations (none of the candidates ran once that reserve
    was taken)."""
    from tunesmith.selection import race as race_mod

    def fake(recipe, run_dir, folds, callbacks, metric, direction, until=None):
        time.sleep(0.4)
        return {"score": 0.8, "folds": None, "n": 24, "test": 0.8, "stopped": None, "best_epochs": 2.0,
                "trained": 2.0, "evals": 8, "eval_seconds": 0.2}

    monkeypatch.setattr(race_mod, "run_candidate", fake)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, tmp_path / "r.csv"))
    race = race_for(recipe, tmp_path, 0.001, 0.0)
    race.folds = None
    race.attempt("plain", {}, None, reserve=0.0)
    seconds = race.results[0]["seconds"]
    assert race.eval_s == pytest.approx(0.025)
    assert race.ratio("plain") == pytest.approx((seconds - 0.2) / (2 * 24 * 0.001))
    refit = (seconds - 0.2) * 27 / 24 + 2 * 0.025           # 2 epochs of 27 steps (216 rows), 1 evaluation each
    assert race.reserve() == pytest.approx(refit)
    race.auto_epochs, race.auto_evals = 2.0, 4.0
    assert race.run_estimate("x", None) == pytest.approx(seconds - 0.2 + 8 * 0.025)


def test_causal_lm_on_one_split_trains_every_run_to_its_plateau(tmp_path, monkeypatch):
    """A chat recipe naming no training settings (epochs auto) whose K folds do not fit: one validation split; the
    plain recipe runs as `tunesmith train` runs it (epochs auto, not a 3-epoch stand-in), then the candidates the
    task declares, strongest first (the plain recipe's rank at its rate x3 and /3), each under epochs auto too;
    the final model is the refit, trained on train + validation."""
    from test_causal_lm import build_tiny_llama, lm_recipe, write_chats

    import tunesmith.selection.tune as tune_mod

    monkeypatch.setattr(tune_mod, "FOLD_SHARE", 1e-6)         # K folds never fit: the one-split plan
    declared = tune_mod.candidates
    monkeypatch.setattr(tune_mod, "candidates", lambda *a: declared(*a)[:2])   # a short test: the first two
    monkeypatch.setattr(tune_mod.Race, "spend", lambda *a: 0)
    model = build_tiny_llama(tmp_path / "llama")
    recipe = lm_recipe(model, write_chats(tmp_path / "chats.jsonl", n=80))
    recipe["train"] = {k: v for k, v in recipe["train"].items() if k not in ("epochs", "learning_rate")}
    recipe["train"]["max_epochs"] = 6
    recipe = ts.load_recipe(recipe)
    lines = []
    out = tune_mod.tune(recipe, tmp_path / "tune", "300s", say=lines.append)
    text = "\n".join(lines)
    assert "plan (one validation split: K folds do not fit the budget): the plain recipe as `tunesmith train` " \
           "runs it (epochs auto" in text, text
    assert "scoring: validation exact_match on 8 rows (best checkpoint); not by 3-fold" in text, text
    names = [r["name"] for r in out["runs"]]
    assert names == ["plain", "lora r8 lr 0.0006", "lora r8 lr 6.67e-05"], text     # the default rate 2e-4 x3, /3
    for row in out["runs"]:
        run = ts.Run(row["run_dir"])
        assert run.recipe.train.epochs == "auto"
        assert row["best_epochs"] is not None and 0 <= row["score"] <= 1
    assert out["final"] and out["model"] == out["final"]["run_dir"] and out["final"]["rows"] == 68
    assert out["final"]["epochs"] == max(math.ceil(round(out["best"]["best_epochs"], 3)), 1)   # its best checkpoint


def test_under_k_folds_without_time_to_refit_the_model_is_the_plain_recipes_own_run(tiny_bert, tmp_path,
                                                                                   monkeypatch):
    """K-fold scores leave no run to fall back on: the plain recipe's run as `tunesmith train` runs it (epochs auto
    stays auto, not the 3 epochs the folds raced) is the final model when the refit cannot run."""
    import tunesmith.selection.tune as tune_mod

    monkeypatch.setattr(tune_mod, "candidates", lambda *a: [])
    monkeypatch.setattr(tune_mod.Race, "spend", lambda *a: 0)
    monkeypatch.setattr(tune_mod, "refit", lambda *a, **k: None)          # no time left to refit
    data = write_reviews(tmp_path / "r.csv", n=90)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": "auto", "max_epochs": 8}))
    lines = []
    out = tune_mod.tune(recipe, tmp_path / "tune", "120s", say=lines.append)
    assert out["scoring"]["folds"] == 3 and out["final"] is None
    assert out["model"] == str(tmp_path / "tune" / "plain-run")
    run = ts.Run(out["model"])
    assert run.recipe.train.epochs == "auto" and run.metrics["accuracy"] == out["plain_test"]


def test_a_plain_recipe_that_does_not_fit_says_so_and_the_budget_it_needs(tiny_bert, tmp_path, monkeypatch):
    """When the probe's measured step time says even the plain recipe and its refit cannot fit, the error names
    the plain recipe's own cost (not the probe's) and a budget that would do; nothing is left behind."""
    import tunesmith.selection.tune as tune_mod
    from tunesmith.errors import TunesmithError
    from tunesmith.selection.race import Timing

    monkeypatch.setattr(tune_mod, "Timing", lambda step_s, overhead_s, batch: Timing(10.0, overhead_s, batch))
    data = write_reviews(tmp_path / "r.csv", n=120)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 3, "batch_size": 8}))
    with pytest.raises(TunesmithError) as e:
        tune_mod.tune(recipe, tmp_path / "tune", "60s", say=lambda *a: None)
    message = str(e.value)
    assert message.startswith("budget 60s: the plain recipe does not fit: reading the data and the 5-step probe "
                              "run took "), message
    assert "(3 epochs of 9 steps, at the measured 10.00s a step" in message and "give at least --budget " in message
    needed = int(message.rsplit("--budget ", 1)[1].split("s")[0])
    assert needed > 3 * 9 * 10.0 + 3 * 12 * 10.0          # the plain run (72 rows) and its refit (96 rows)
    assert message.endswith("s, or fewer train.epochs")
    assert not Path(tmp_path / "tune").exists()
