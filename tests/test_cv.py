"""tunesmith cv: stratified (and grouped) folds, one run per fold, intervals, out-of-fold predictions, and
compare's paired test over folds."""
import json
import random

import pytest
from conftest import recipe_dict, write_reviews

import tunesmith as ts


def test_folds_are_stratified_and_keep_groups_together(tiny_bert, tmp_path):
    from tunesmith.selection.cv import assignments

    rows = [{"text": "x", "label": "pos" if i % 4 else "neg", "speaker": f"s{i // 3}"} for i in range(120)]
    keys = [r["label"] for r in rows]
    grouped = recipe_dict(tiny_bert, tmp_path / "r.csv")
    grouped["data"]["group_column"] = "speaker"
    recipe = ts.load_recipe(grouped)
    plan = assignments(recipe, rows, keys, folds=4, repeats=2)
    assert len(plan) == 8
    for rep in (plan[:4], plan[4:]):
        assert sorted(i for _, _, te in rep for i in te) == list(range(120))        # each row held out once
    for _, tr, te in plan:
        assert not {rows[i]["speaker"] for i in tr} & {rows[i]["speaker"] for i in te}
        neg = sum(keys[i] == "neg" for i in te) / len(te)
        assert 0.15 <= neg <= 0.35                                                  # 0.25 overall
    plain = ts.load_recipe(recipe_dict(tiny_bert, tmp_path / "r.csv"))
    assert assignments(plain, rows, keys, 4, 1) == assignments(plain, rows, keys, 4, 1)   # seeded


def test_cv_command_and_paired_compare(tiny_bert, tmp_path, capsys):
    import yaml

    from tunesmith.cli import main

    data = write_reviews(tmp_path / "r.csv", n=90)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_bert, data, train={"epochs": 3, "log_every": 5})))
    assert main(["cv", str(path), "--folds", "3", "--dir", str(tmp_path / "good")]) == 0      # the CLI, in process
    assert "95% interval" in capsys.readouterr().out
    cv = json.loads((tmp_path / "good" / "cv.json").read_text())
    acc = cv["metrics"]["accuracy"]
    assert len(acc["values"]) == 3 and acc["low"] <= acc["mean"] <= acc["high"]
    for name, value in zip(cv["runs"], acc["values"]):
        assert ts.Run(tmp_path / "good" / name).metrics["accuracy"] == value
    oof = [json.loads(x) for x in (tmp_path / "good" / "oof.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in oof) == list(range(90)) and {"label", "target", "fold"} <= set(oof[0])
    assert main(["cv", str(path), "--folds", "3", "--dir", str(tmp_path / "bad"), "train.learning_rate=1e-7"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "good"), str(tmp_path / "bad")]) == 0
    out = capsys.readouterr().out
    assert "p (paired)" in out and "accuracy" in out
    assert main(["cv", str(path), "--folds", "2", "--dir", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "good"), str(tmp_path / "two")]) == 1               # other folds
    assert "different folds" in capsys.readouterr().err


def test_paired_test_tells_a_real_gap_from_noise():
    from tunesmith.selection.cv import interval, paired

    rng = random.Random(0)
    base = [0.7 + rng.gauss(0, 0.02) for _ in range(10)]
    def cv(values):
        return {"assignment": "x", "test_fraction": 0.1, "metrics": {"accuracy": interval(values)}}
    gap = paired(cv([v + 0.05 for v in base]), cv(base))["accuracy"]
    assert gap["difference"] == pytest.approx(0.05) and gap["p"] < 0.01
    noise = paired(cv([v + rng.gauss(0, 0.02) for v in base]), cv(base))["accuracy"]
    assert noise["p"] > 0.05
    with pytest.raises(ts.TunesmithError, match="different folds"):
        paired(cv(base), {**cv(base), "assignment": "y"})
