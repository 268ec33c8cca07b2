"""Few-shot (issue 25, item 1): data.shots samples K rows per class reproducibly; adapt.method contrastive trains the
encoder on pairs and fits a logistic-regression head, and its run folder predicts, evaluates, serves and reloads
like any text-classification run."""
import json

import pytest
from conftest import recipe_dict, tunesmith, write_reviews

import tunesmith as ts
from tunesmith.pipeline import train
from tunesmith.recipe import RecipeError, load
from tunesmith.splits import load_data
from tunesmith.tasks import get_task
from tunesmith.tasks.contrastive import pairs


def recipe_with(model, data, data_keys: dict, **sections) -> dict:
    recipe = recipe_dict(model, data, **sections)
    recipe["data"].update(data_keys)
    return recipe


def sampled(model, data, shots, seed=0, **data_keys):
    recipe = load(recipe_with(model, data, {"shots": shots, **data_keys}, train={"seed": seed}))
    task = get_task(recipe)
    task.setup()
    return load_data(task, recipe)


def labels_of(loaded):
    return [r["label"] for r in loaded.tables["train"].rows]


def test_shots_are_k_per_class_reproducible_and_nested(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=200)
    plain = sampled(tiny_bert, data, None)
    a, b, bigger = sampled(tiny_bert, data, 8), sampled(tiny_bert, data, 8), sampled(tiny_bert, data, 16)
    assert sorted(labels_of(a)) == ["neg"] * 8 + ["pos"] * 8
    assert a.tables["train"].rows == b.tables["train"].rows                    # same K and seed: same rows
    assert a.tables["train"].origins == b.tables["train"].origins
    assert set(a.tables["train"].origins) < set(bigger.tables["train"].origins)  # a larger K adds to them
    other = sampled(tiny_bert, data, 8, seed=1)
    assert other.tables["train"].origins != a.tables["train"].origins          # the seed decides the rows
    for split in ("validation", "test"):                                        # held-out rows stay as they are
        assert a.tables[split].rows == plain.tables[split].rows
    assert set(a.tables["train"].origins) <= set(plain.tables["train"].origins)
    assert a.sampled == {"shots": 8, "seed": 0, "from": len(plain.tables["train"]), "kept": 16, "short": {}}
    assert a.shot_lines()[0].startswith(f"data.shots: sampled 8 per class from {len(plain.tables['train'])} train")
    assert "validation and test rows are not sampled (validation 40, test 40)" in a.shot_lines()[0]


def test_a_small_class_keeps_all_its_rows_with_a_warning(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=120)
    with open(data, "a") as f:                          # a third class of 5 rows, split off only from train
        f.writelines(f"rare text number {i} superb,rare\n" for i in range(5))
    valid = write_reviews(tmp_path / "v.csv", n=20)
    loaded = sampled(tiny_bert, data, 8, validation=str(valid), test=str(valid))
    assert labels_of(loaded).count("rare") == 5 and labels_of(loaded).count("pos") == 8
    assert loaded.sampled["short"] == {"rare": 5}
    assert loaded.shot_lines()[1] == "warning: data.shots=8: class 'rare' has only 5 train row(s); all of them are used"


def test_doctor_says_what_shots_sampled(tiny_bert, tmp_path):
    from tunesmith.diagnosis.report import render

    data = write_reviews(tmp_path / "r.csv", n=120)
    with open(data, "a") as f:
        f.writelines(f"rare text number {i} superb,rare\n" for i in range(3))
    valid = write_reviews(tmp_path / "v.csv", n=20)
    recipe = recipe_with(tiny_bert, data, {"shots": 8, "validation": str(valid), "test": str(valid)},
                         doctor={"label_noise": False})
    report = ts.doctor(recipe, out=None)
    assert report["shots"]["kept"] == 19 and report["splits"]["train"] == 19
    assert "data.shots=8: class 'rare' has only 3 train row(s); all of them are used" in report["warnings"]
    assert "data.shots: sampled 8 per class from 123 train rows (19 kept, seed 0)" in render(report)


def test_shots_and_contrastive_are_text_classification_keys():
    bad = {"task": "causal-lm", "model": "m", "data": {"train": "a.jsonl", "shots": 8},
           "adapt": {"method": "contrastive"}}
    with pytest.raises(RecipeError) as e:
        load(bad)
    assert "data.shots: does not apply to task 'causal-lm'; it is a key of text-classification" in str(e.value)
    assert "adapt.method: 'contrastive' does not apply to task 'causal-lm'; it is a value for text-classification" \
        in str(e.value)
    with pytest.raises(RecipeError, match="did you mean 'data.shots'"):
        load({"task": "text-classification", "model": "m", "data": {"train": "a.csv", "shot": 8}})
    recipe = load({"task": "text-classification", "model": "m", "data": {"train": "a.csv"},
                   "adapt": {"method": "contrastive"}})
    assert recipe.train.epochs == 1                     # auto: one epoch over the pairs (no validation curve)


def test_pairs_are_seeded_and_balanced():
    rows = [{"input_ids": [i], "labels": i % 2} for i in range(8)]
    a, b = pairs(rows, 3, seed=0), pairs(rows, 3, seed=0)
    assert a == b and len(a) == 8 * 3 * 2 and a != pairs(rows, 3, seed=1)
    for p in a:
        same = (p["input_ids"][0] % 2) == (p["pair_ids"][0] % 2)
        assert p["similarity"] == float(same) and (not same or p["input_ids"] != p["pair_ids"])


@pytest.fixture(scope="module")
def fewshot_run(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fewshot")
    data = write_reviews(tmp / "reviews.csv", n=200)
    # the tiny random BERT's pooled [CLS] vectors start nearly parallel: a high rate moves them apart
    recipe = load(recipe_with(tiny_bert, data, {"shots": 8}, adapt={"method": "contrastive"},
                              train={"epochs": 4, "learning_rate": 5e-3}))
    return train(recipe, run_dir=tmp / "run")


def test_contrastive_run_trains_pairs_and_fits_the_head(fewshot_run):
    p = fewshot_run.path
    records = [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "split" not in r and not r.get("summary")]
    assert len(losses) == 4 * (16 * 20 * 2) // 16       # 16 rows x 20 rounds x 2 pairs, batch 16, 4 epochs
    assert sum(losses[-5:]) < 0.2 * sum(losses[:5])
    validation = [r for r in records if r.get("split") == "validation"]
    assert len(validation) == 1 and validation[0]["accuracy"] > 0.6        # scored once, after the head is fitted
    splits = json.loads((p / "data" / "splits.json").read_text())
    assert splits["rows"]["train"] == 16 and splits["shots"]["kept"] == 16
    assert json.loads((p / "eval.json").read_text())["accuracy"] > 0.6     # 40 rows; chance 0.5


def test_contrastive_run_predicts_evaluates_serves_and_reloads(fewshot_run):
    """The saved model is a plain sequence-classification folder: the predictor, the server, the CLI and
    transformers' own pipeline agree, and `evaluate` on the run's test rows gives eval.json's accuracy."""
    from fastapi.testclient import TestClient
    from transformers import pipeline

    texts = ["the movie was superb", "a dull and clumsy plot", "the cast is lovely", "weak acting"]
    predictor = ts.Run(fewshot_run.path).load("cpu")
    got = predictor.predict(texts)
    with TestClient(ts.create_app(predictor)) as client:
        assert client.post("/v1/predict", json={"inputs": texts}).json()["predictions"] == got
    out = tunesmith("predict", fewshot_run.path, *texts)
    assert out.returncode == 0, out.stderr
    assert [json.loads(x) for x in out.stdout.splitlines()] == got
    pipe = pipeline("text-classification", model=str(fewshot_run.path / "model"))
    assert [r["label"] for r in pipe(texts)] == [g["label"] for g in got]
    result = predictor.evaluate(str(fewshot_run.path / "data" / "test.jsonl"))
    assert result["accuracy"] == json.loads((fewshot_run.path / "eval.json").read_text())["accuracy"]
