"""epochs: auto (stops on a plateau, restores the best), defaults resolved per method and data size, and the
one line that says what the validation curve saw (likely undertrained / overfitting)."""
import html

import pytest
import torch
from conftest import recipe_dict, write_reviews
from safetensors.torch import load_file

import tunesmith as ts
from tunesmith import defaults
from tunesmith.curve import verdict
from tunesmith.pipeline import train
from tunesmith.recipe import load

BASE = {"model": "m", "data": {"train": "x.csv"}}


def validations(run):
    return [r for r in run.history if r.get("split") == "validation"]


def test_auto_is_the_default_and_stops_on_a_plateau_restoring_the_best(tiny_bert, tmp_path, capsys):
    """No train.epochs: auto. The tiny model reaches its best accuracy, then `patience` evaluations without a better
    one end training long before train.max_epochs; model/ holds the best evaluation's weights, and the run says why
    it stopped (terminal, metrics.jsonl, run.json)."""
    data = write_reviews(tmp_path / "r.csv", n=300)
    recipe = recipe_dict(tiny_bert, data, train={"eval_every": 6, "patience": 3, "max_epochs": 40, "min_steps": 36})
    del recipe["train"]["epochs"]
    run = train(load(recipe), run_dir=tmp_path / "run")
    assert load(run.path / "recipe.yaml").train.epochs == "auto"
    evals = validations(run)
    best = max(e["accuracy"] for e in evals)
    first_best = next(e["step"] for e in evals if e["accuracy"] == best)
    assert best > 0.9 and first_best > 36 - 3 * 6       # learnt; the chance-level start (< min_steps) did not stop it
    kept = run.training["best_step"]                    # a later tie at the best accuracy is kept when its loss fell
    at = {e["step"]: e for e in evals}                  # by defaults.LOSS_DELTA from the kept checkpoint's
    assert kept >= first_best and at[kept]["accuracy"] == best
    assert kept == first_best or at[kept]["loss"] <= at[first_best]["loss"] - defaults.LOSS_DELTA
    assert evals[-1]["step"] == kept + 3 * 6 < 40 * 12                # exactly `patience` evaluations after the best
    ended = run.training["ended"]
    assert ended.startswith(f"stopped: validation accuracy has not improved for 3 evaluations since epoch "
                            f"{kept / 12:.1f} (step {kept})")
    out = capsys.readouterr().out
    assert ended in out and "on 60 held-out rows (checkpoint choice)" in out
    assert run.history[-1]["summary"] and run.history[-1]["ended"] == ended
    saved = load_file(str(run.path / "model" / "model.safetensors"))
    kept = load_file(str(run.path / "checkpoints" / "best" / "model.safetensors"))
    last = load_file(str(run.path / "checkpoints" / f"step-{evals[-1]['step']:08d}" / "model.safetensors"))
    shared = [k for k in kept if k in saved]
    assert len(shared) > 10 and all(torch.equal(saved[k], kept[k]) for k in shared)
    assert any(not torch.equal(last[k], kept[k]) for k in shared)     # the final step's weights were not kept


def test_auto_does_not_stop_before_min_steps_and_keeps_its_cap(tiny_bert, tmp_path):
    """Under auto, train.min_steps is a floor for the early stop (the plateau is only acted on past it);
    train.max_epochs caps training, and the learning-rate schedule runs over that cap."""
    data = write_reviews(tmp_path / "r.csv", n=100)      # 60 train rows, batch 16: 4 steps per epoch
    run = train(load(recipe_dict(tiny_bert, data, train={"epochs": "auto", "learning_rate": 1e-9, "patience": 1,
                                                          "eval_every": 1, "min_steps": 10, "max_epochs": 5})),
                run_dir=tmp_path / "run")
    steps = [e["step"] for e in validations(run)]
    assert steps[-1] == 10                                # loss barely moves: the plateau waits for the floor
    assert run.training["ended"].startswith("stopped: validation accuracy has not improved")
    capped = train(load(recipe_dict(tiny_bert, data, train={"epochs": "auto", "max_epochs": 2, "eval_every": 2})),
                   run_dir=tmp_path / "capped")
    assert capped.training["ended"] == "stopped: reached train.max_epochs=2 (8 steps)"
    assert capped.training["steps"] == 8


def test_budget_stops_training_and_says_so(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=100)
    run = train(load(recipe_dict(tiny_bert, data, train={"epochs": 50, "budget": "1s"})), run_dir=tmp_path / "run")
    assert run.training["ended"].startswith("stopped: time budget train.budget=1s used at step ")
    assert run.training["steps"] < 50 * 4


def test_defaults_follow_the_method_and_the_data_size():
    text = load({**BASE, "task": "text-classification"})
    assert text.train.learning_rate is None and text.train.batch_size is None and text.train.epochs == "auto"
    full, lines = defaults.resolve(text, 2000)
    assert (full.train.learning_rate, full.train.batch_size) == (5e-5, 32)
    assert "learning_rate 5e-05, batch_size 32" in lines[0] and text.train.learning_rate is None  # a copy
    assert defaults.resolve(text, 757)[0].train.batch_size == 16        # small data: more steps per epoch
    assert defaults.resolve(text, 192)[0].train.batch_size == 8
    lora = load({**BASE, "task": "text-classification", "adapt": {"method": "lora"}})
    assert defaults.resolve(lora, 500)[0].train.learning_rate == 2e-4
    head = load({**BASE, "task": "image-classification", "adapt": {"method": "freeze"}})
    assert defaults.resolve(head, 500)[0].train.learning_rate == 1e-3   # a new head alone
    chat = load({**BASE, "task": "causal-lm"})                          # LoRA by default: the LoRA rate
    assert defaults.resolve(chat, 240)[0].train.learning_rate == 2e-4
    assert defaults.resolve(load({**BASE, "task": "causal-lm", "adapt": {"method": "full"}}), 240)[0] \
        .train.learning_rate == 2e-5
    mine = load({**BASE, "task": "text-classification", "adapt": {"method": "lora"},
                 "train": {"learning_rate": 1e-5, "batch_size": 4, "epochs": 3}})
    kept, lines = defaults.resolve(mine, 5000)
    assert (kept.train.learning_rate, kept.train.batch_size) == (1e-5, 4) and lines == []
    assert kept.train.patience is None and kept.train.eval_every is None   # a number of epochs: no auto cadence


def test_auto_cadence_and_patience_adapt_to_the_data_size():
    text = load({**BASE, "task": "text-classification"})
    small = defaults.resolve(text, 192)[0].train                        # 24 steps per epoch: 4 evaluations
    assert (small.eval_every, small.patience) == (6, 8)                 # patience: two epochs of evaluations
    large = defaults.resolve(text, 32 * 500)[0].train                   # 500 steps per epoch: once per epoch
    assert (large.eval_every, large.patience) == (500, 3)
    mine = defaults.resolve(load({**BASE, "task": "text-classification", "train": {"patience": 2}}), 192)[0]
    assert mine.train.patience == 2


def test_auto_evaluations_do_not_bunch_at_epoch_ends():
    """27 steps an epoch, an evaluation every 7: without auto 7, 14, 21, 27, 28 (27 and 28 one step apart, both
    counted toward patience); under auto the cadence restarts each epoch, 7, 14, 21, 27, 34, ..., and an
    evaluation under half an eval_every before an epoch's end is dropped (per epoch 24: 7, 14, 24)."""
    from tunesmith.steps import Schedule

    def steps(schedule, per_epoch, epochs=2):
        return [e * per_epoch + p for e in range(epochs) for p in range(1, per_epoch + 1)
                if schedule.evaluates(e * per_epoch + p, p, per_epoch)]

    fixed = Schedule(per_epoch=27, total=54, warmup=0, eval_every=7, save_every=7)
    assert steps(fixed, 27) == [7, 14, 21, 27, 28, 35, 42, 49, 54]
    auto = Schedule(per_epoch=27, total=540, warmup=0, eval_every=7, save_every=7, auto=True)
    assert steps(auto, 27) == [7, 14, 21, 27, 34, 41, 48, 54]
    auto24 = Schedule(per_epoch=24, total=480, warmup=0, eval_every=7, save_every=7, auto=True)
    assert steps(auto24, 24) == [7, 14, 24, 31, 38, 48]             # 21 is 3 steps before 24: dropped
    gaps = [b - a for a, b in zip(steps(auto24, 24, 5), steps(auto24, 24, 5)[1:])]
    assert min(gaps) >= 7 / 2


def test_resolved_defaults_are_printed_and_written_to_the_runs_recipe(tiny_bert, tmp_path, capsys):
    data = write_reviews(tmp_path / "r.csv", n=100)
    recipe = recipe_dict(tiny_bert, data, adapt={"method": "lora"}, train={"epochs": 1})
    del recipe["train"]["learning_rate"], recipe["train"]["batch_size"]
    run = train(load(recipe), run_dir=tmp_path / "run")
    saved = load(run.path / "recipe.yaml").train
    assert (saved.learning_rate, saved.batch_size) == (2e-4, 8)          # 60 rows: the smallest batch
    assert "train: learning_rate 0.0002, batch_size 8 (defaults for adapt.method lora" in capsys.readouterr().out


@pytest.mark.parametrize("values, direction, auto, kind, words", [
    ([0.60, 0.66, 0.71, 0.74], "max", False, "undertrained",
     "likely undertrained: validation accuracy still rising at the last evaluation (0.71 -> 0.74); raise "
     "train.epochs or use epochs: auto"),
    ([0.60, 0.66, 0.71, 0.74], "max", True, "undertrained", "(0.71 -> 0.74); raise train.max_epochs"),
    ([0.9, 0.7, 0.5, 0.6, 0.8], "min", False, "overfitting",
     "overfitting after step 30: validation accuracy rose from 0.5 to 0.8; lower train.epochs or use epochs: auto"),
    ([0.70, 0.80, 0.79, 0.80], "max", False, None, None),             # flat at its best: nothing to say
    ([0.70, 0.80, 0.78], "max", False, None, None),                   # a small dip, within noise
    ([0.5, 0.9, 0.6], "max", True, None, None),                       # auto stopped there and restored the best
    ([0.5], "max", False, None, None),
])
def test_the_curve_verdict(values, direction, auto, kind, words):
    cfg = load({**BASE, "task": "text-classification", "train": {"epochs": "auto" if auto else 3}}).train
    seen = verdict([(10 * (i + 1), v) for i, v in enumerate(values)], "accuracy", direction, cfg, auto)
    assert (seen or {}).get("kind") == kind
    if words:
        assert words in seen["line"]


def test_a_short_run_says_it_is_likely_undertrained(tiny_bert, tmp_path, capsys):
    """Three epochs of the tiny model: validation loss still falls at the last evaluation, and the run says so,
    with the key to change (terminal, metrics.jsonl's summary, run.json)."""
    data = write_reviews(tmp_path / "r.csv", n=300)
    run = train(load(recipe_dict(tiny_bert, data, train={"epochs": 3, "eval_every": 6, "metric": "loss"})),
                run_dir=tmp_path / "run")
    losses = [e["loss"] for e in validations(run)]
    assert losses[-1] < min(losses[:-1])
    curve = run.training["curve"]
    assert curve["kind"] == "undertrained" and curve["key"] == "train.epochs"
    assert curve["line"].startswith("likely undertrained: validation loss still falling at the last evaluation")
    assert curve["line"] in capsys.readouterr().out and run.history[-1]["curve"] == curve
    assert ts.Run(run.path).training == run.training
    from tunesmith.insight.report import write_report

    page = write_report([run.path], tmp_path / "report.html", explain=False).read_text()
    assert html.escape(curve["line"]) in page and html.escape(run.training["ended"]) in page


def test_causal_lm_with_no_training_keys_gets_the_lora_rate_and_auto(tmp_path):
    """A chat recipe naming no training settings: LoRA (the task's method) at the LoRA rate, a batch sized to the
    data, epochs: auto evaluating validation loss several times per epoch, capped here by train.max_epochs."""
    from test_causal_lm import build_tiny_llama, lm_recipe, write_chats

    model = build_tiny_llama(tmp_path / "llama")
    recipe = lm_recipe(model, write_chats(tmp_path / "c.jsonl", n=80), train={"max_epochs": 2})
    recipe["train"] = {k: v for k, v in recipe["train"].items() if k not in ("epochs", "learning_rate", "batch_size")}
    run = train(load(recipe), run_dir=tmp_path / "run")
    saved = load(run.path / "recipe.yaml").train
    assert (saved.epochs, saved.learning_rate, saved.batch_size) == ("auto", 2e-4, 8)
    steps = [e["step"] for e in validations(run)]
    per_epoch = run.training["steps"] / run.training["epochs"]
    assert len(steps) >= 4 and steps[0] == saved.eval_every and saved.eval_every < per_epoch   # several per epoch
    assert run.training["ended"].startswith("stopped: ") and saved.patience >= 3
    # eval.generate is set: auto stops on exact match of answers generated for the validation rows
    assert saved.metric == "exact_match" and all("exact_match" in e and "loss" in e for e in validations(run))
    assert run.training["ended"].startswith(("stopped: validation exact_match", "stopped: reached train.max_epochs"))


def test_causal_lm_auto_with_eval_generate_defaults_to_exact_match():
    """The metric epochs: auto stops on: exact match with eval.generate; loss without it or with a number of
    epochs (as before); exact match without eval.generate is a recipe error naming the fix."""
    chat = {**BASE, "task": "causal-lm", "eval": {"generate": {"max_new_tokens": 4}}}
    assert (load(chat).train.metric, load(chat).direction) == ("exact_match", "max")
    assert load({**chat, "train": {"epochs": 3}}).train.metric == "loss"
    assert load({**BASE, "task": "causal-lm"}).train.metric == "loss"
    assert load({**chat, "train": {"metric": "loss"}}).train.metric == "loss"
    with pytest.raises(ts.RecipeError, match="train.metric exact_match scores generated answers: set eval.generate"):
        load({**BASE, "task": "causal-lm", "train": {"metric": "exact_match"}})


def test_an_improvement_under_auto_needs_a_margin_and_ties_are_broken_by_the_loss():
    """defaults.min_delta: half a validation row for a rate metric, LOSS_DELTA for a loss, train.min_delta over
    both; metrics.improves: a tie of the metric counts only when the loss fell by LOSS_DELTA, a drop never."""
    from tunesmith.metrics import improves

    cfg = load({**BASE, "task": "text-classification"}).train
    assert defaults.min_delta(cfg, "max", 40) == 0.5 / 40 and defaults.min_delta(cfg, "min", 40) == defaults.LOSS_DELTA
    assert defaults.min_delta(load({**BASE, "task": "text-classification", "train": {"min_delta": 0.2}}).train,
                              "max", 40) == 0.2
    row = 0.5 / 40
    assert improves("max", 0.600, 0.575, row)                           # one row more right
    assert not improves("max", 0.580, 0.575, row)                       # F1 jitter under half a row
    assert improves("max", 0.575, 0.575, row, loss=0.40, best_loss=0.45, loss_delta=0.01)   # a tie, loss down 0.05
    assert not improves("max", 0.575, 0.575, row, loss=0.445, best_loss=0.45, loss_delta=0.01)  # loss down 0.005
    assert not improves("max", 0.550, 0.575, row, loss=0.10, best_loss=0.45, loss_delta=0.01)   # worse: never
    assert not improves("min", 0.495, 0.5, 0.01) and improves("min", 0.489, 0.5, 0.01)
    assert improves("max", 0.1, None, row) and not improves("max", float("nan"), None, row)


def scripted(monkeypatch, values: list[dict]):
    """The tiny model's validation evaluations report `values` in turn (the last repeated), over its own."""
    from tunesmith.tasks.text_classification import TextClassification

    real, calls = TextClassification.evaluate, []

    def evaluate(self, model, features, batch_size):
        calls.append(1)
        return {**real(self, model, features, batch_size), **values[min(len(calls), len(values)) - 1]}

    monkeypatch.setattr(TextClassification, "evaluate", evaluate)


def test_auto_stops_on_a_plateau_of_tiny_loss_improvements_and_epochs_n_is_unaffected(tiny_bert, tmp_path,
                                                                                        monkeypatch):
    """Validation loss falling 0.001 an evaluation (saturated data: under LOSS_DELTA) is a plateau under auto:
    `patience` evaluations after the first, not the train.max_epochs cap; a tied accuracy whose loss falls by 0.05
    is an improvement (the later checkpoint kept), by 0.001 not. `epochs: 2` trains its 8 steps and keeps the
    strictly best evaluation, as before."""
    data = write_reviews(tmp_path / "r.csv", n=100)      # 60 train rows, batch 16: 4 steps per epoch
    scripted(monkeypatch, [{"loss": 1.0 - 0.001 * k, "accuracy": 0.5} for k in range(40)])
    auto = {"epochs": "auto", "max_epochs": 5, "eval_every": 1, "patience": 3}
    run = train(load(recipe_dict(tiny_bert, data, train={**auto, "metric": "loss"})), run_dir=tmp_path / "loss")
    assert [e["step"] for e in validations(run)] == [1, 2, 3, 4] and run.training["best_step"] == 1
    assert run.training["ended"].startswith("stopped: validation loss has not improved for 3 evaluations")

    scripted(monkeypatch, [{"loss": 1.0 - 0.05 * k, "accuracy": 0.5} for k in range(4)]
             + [{"loss": 0.85 - 0.001 * k, "accuracy": 0.5} for k in range(1, 40)])
    tie = train(load(recipe_dict(tiny_bert, data, train=auto)), run_dir=tmp_path / "tie")
    assert tie.training["best_step"] == 4 and [e["step"] for e in validations(tie)][-1] == 7

    scripted(monkeypatch, [{"loss": 1.0 - 0.001 * k, "accuracy": 0.5} for k in range(40)])
    fixed = train(load(recipe_dict(tiny_bert, data, train={"epochs": 2, "eval_every": 1, "metric": "loss"})),
                  run_dir=tmp_path / "fixed")
    assert fixed.training["steps"] == 8 and fixed.training["best_step"] == 8
