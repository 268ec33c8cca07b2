"""The Python API (`import tunesmith as ts`), per-task recipe sections, the Task registry, run folders that
move and old run folders that still read, and the CLI's argument order and error display."""
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml
from conftest import recipe_dict, tunesmith, write_reviews

import tunesmith as ts

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    data = write_reviews(tmp / "r.csv", n=200)
    return ts.train(ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 4})), run_dir=tmp / "run")


def test_readme_python_example_trains_evaluates_predicts(tiny_bert, tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    write_reviews(tmp_path / "reviews.csv", n=300)
    recipe = recipe_dict(tiny_bert, Path("reviews.csv"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    accuracy, f1 = map(float, out[-4].split()[-2:])
    assert accuracy > 0.8 and f1 > 0.8, out
    assert "'label': 'pos'" in out[-3] or "'label': 'neg'" in out[-3]
    assert float(out[-2]) > 0.8                                     # evaluate() on a file
    assert int(out[-1].split()[0]) == len(ts.Run("runs/api-example").history) > 0
    assert callable(ts.train) and ts.train.__module__ == "tunesmith.pipeline"   # the function, not a module


def test_flat_namespace_recipe_rejected_before_torch_naming_each_key(tmp_path):
    """Keys of other tasks in a text-classification recipe, a typo inside eval.generate: one error each,
    all at once, and torch is never imported."""
    recipe = {"task": "text-classification", "model": "minilm",
              "data": {"train": "x.csv", "image_column": "img"},
              "augment": {"hflip": 0.5}, "train": {"packing": True, "metric": "ece"},
              "eval": {"generate": {"max_new_token": 8}}}
    code = ("import sys, tunesmith as ts\n"
            f"try:\n    ts.load_recipe({recipe!r})\nexcept ts.RecipeError as e:\n    print('\\n'.join(e.errors))\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("no torch"), out
    errors = out.strip().splitlines()[:-1]
    assert len(errors) == 4, out
    assert any(e.startswith("data.image_column: does not apply to task 'text-classification'")
               and "image-classification" in e for e in errors)
    assert any(e.startswith("augment: does not apply") and "image-classification" in e for e in errors)
    assert any(e.startswith("train.packing: does not apply") and "causal-lm" in e for e in errors)
    assert any(e.startswith("eval.generate: does not apply") and "causal-lm" in e for e in errors)
    # within the task that has generate, the typo is caught with a did-you-mean
    lm = {"task": "causal-lm", "model": "m", "data": {"train": "x.jsonl"},
          "eval": {"generate": {"max_new_token": 8}}, "train": {"metric": "accuracy"}}
    with pytest.raises(ts.RecipeError) as e:
        ts.load_recipe(lm)
    text = "\n".join(e.value.errors)
    assert "did you mean 'eval.generate.max_new_tokens'" in text
    assert "train.metric 'accuracy' is not a metric of task 'causal-lm'" in text and "perplexity" in text


def test_load_recipe_is_pure_and_train_leaves_the_recipe_alone(tiny_bert, tmp_path):
    given = recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=120), train={"max_steps": 2})
    given["adapt"] = {"lora": {"r": 4}}
    snapshot = json.loads(json.dumps(given))
    recipe = ts.load_recipe(given, overrides=["adapt.lora.alpha=8", "train.seed=3"])
    assert given == snapshot                                        # nested dicts untouched
    assert recipe.adapt.method == "full" and recipe.train.metric == "accuracy"   # the task's defaults, filled in
    before = recipe.model_dump()
    records, ended = [], []

    class End(ts.Callback):
        def on_end(self, run):
            ended.append(run.metrics)

    run = ts.train(recipe, run_dir=tmp_path / "run", callbacks=[records.append, End()])
    assert recipe.model_dump() == before
    assert records == run.history and records[-1]["summary"]     # every metrics.jsonl record, in order
    assert ended == [run.metrics] and run.metrics["n_examples"] > 0


def test_doctor_reads_the_processor_without_loading_weights(tiny_bert, tmp_path):
    """Checks that need no embeddings (label_noise off, text near-duplicates) load the tokenizer alone."""
    from tunesmith.diagnosis.diagnose import diagnose

    given = recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=120))
    given["doctor"] = {"label_noise": False, "near_method": "text"}
    report = diagnose(ts.load_recipe(given))
    assert "model" not in report["seconds"] and report["lengths"]["available"]
    given["doctor"] = {"label_noise": True}
    assert "model" in diagnose(ts.load_recipe(given))["seconds"]     # embeddings: the weights load


def test_metric_with_lower_is_better_keeps_the_best_calibrated_checkpoint(tiny_bert, tmp_path):
    """train.metric: ece selects the lowest validation ECE (the direction comes from the task's metrics, not
    from the metric's name)."""
    data = write_reviews(tmp_path / "r.csv", n=200)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 6, "eval_every": 3, "metric": "ece"}))
    assert recipe.direction == "min"
    run = ts.train(recipe, run_dir=tmp_path / "run")
    evals = [r for r in run.history if r.get("split") == "validation"]
    assert len({round(r["ece"], 6) for r in evals}) > 2             # the choice is not trivial
    best = json.loads((run.path / "checkpoints" / "best" / "state.json").read_text())
    lowest = min(evals, key=lambda r: (r["ece"], r["step"]))
    assert best["ece"] == pytest.approx(lowest["ece"]) and best["step"] == lowest["step"]
    assert best["ece"] < max(r["ece"] for r in evals)


def test_moved_run_folder_still_evaluates_and_predicts(run, tmp_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run.path, moved)
    hidden = run.path.with_name("hidden")
    run.path.rename(hidden)                                         # nothing may point back at the old place
    try:
        out = tunesmith("eval", moved)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["accuracy"] == pytest.approx(ts.Run(moved).metrics["accuracy"])
        out = tunesmith("predict", moved, "good film")
        assert out.returncode == 0 and json.loads(out.stdout)["label"] in ("pos", "neg"), out.stderr
    finally:
        hidden.rename(run.path)


def test_schema1_run_folder_still_reads(run, tmp_path):
    """Runs written before per-task sections dumped every task's keys; they load, predict and evaluate."""
    old = tmp_path / "old"
    shutil.copytree(run.path, old)
    (old / "run.json").unlink()
    flat = yaml.safe_load((old / "recipe.yaml").read_text())
    flat["data"] |= {"image_column": "image", "messages_column": "messages", "image_size": None, "chat_template": None}
    flat["train"] |= {"packing": False, "pack_length": None, "metric": None}
    flat["eval"] |= {"generate": None}
    flat["augment"] = {"hflip": 0.0, "policy": "none"}
    (old / "recipe.yaml").write_text(yaml.safe_dump(flat))
    assert ts.Run(old).schema == 1 and ts.Run(run.path).schema == 2
    model = ts.Run(old).load(device="cpu")
    assert model.predict("good film")["label"] in ("pos", "neg")
    assert model.evaluate()["accuracy"] == pytest.approx(run.metrics["accuracy"])


def test_predictor_is_safe_from_several_threads(run):
    model = run.load(device="cpu")
    texts = [f"the film was {w}" for w in ("good", "awful", "great", "dull", "superb", "boring")] * 5
    expected = model.predict(texts)
    results, errors = {}, []

    def work(k):
        try:
            results[k] = [model.predict(t) for t in texts]
        except Exception as e:                                      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == expected for r in results.values())


def test_a_task_from_outside_registers_with_one_call_and_trains(tiny_bert, tmp_path):
    from tunesmith.tasks.schema import TextClassificationData, TextClassificationRecipe
    from tunesmith.tasks.text_classification import TextClassification

    class ShoutData(TextClassificationData):
        shout: bool = True                                          # this task's own key

    class Shout(TextClassification):
        name = "shout-classification"

        def encode(self, rows):
            col = self.recipe.data.text_column
            return super().encode([{**r, col: r[col].upper() if self.recipe.data.shout else r[col]} for r in rows])

    class ShoutRecipe(TextClassificationRecipe):
        task_class: ClassVar = Shout
        task: Literal["shout-classification"]
        data: ShoutData

    ts.register_task(ShoutRecipe)
    given = recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=160), task="shout-classification")
    given["data"]["shout"] = False
    recipe = ts.load_recipe(given)
    assert type(recipe) is ShoutRecipe
    with pytest.raises(ts.RecipeError, match="data.shout: does not apply to task 'text-classification'"):
        ts.load_recipe({**given, "task": "text-classification"})
    run = ts.train(recipe, run_dir=tmp_path / "run")
    assert run.metrics["accuracy"] > 0.8
    assert run.load(device="cpu").predict("good film")["label"] in ("pos", "neg")


def test_cli_takes_options_and_overrides_in_any_order_and_debug_shows_tracebacks(tiny_bert, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_bert, write_reviews(tmp_path / "r.csv", n=120))))
    out = tunesmith("train", path, "--run-dir", tmp_path / "run", "train.max_steps=2", "train.eval_every=1",
                    "train.threads=1")
    assert out.returncode == 0, out.stderr
    assert "threads: 1 (train.threads)" in out.stdout
    assert [r["step"] for r in ts.Run(tmp_path / "run").history if r.get("split")] == [1, 2]
    out = tunesmith("predict", tmp_path / "nowhere", "text")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "not a run folder" in out.stderr
    out = tunesmith("--debug", "predict", tmp_path / "nowhere", "text")
    assert out.returncode != 0 and "Traceback" in out.stderr and "TunesmithError" in out.stderr
