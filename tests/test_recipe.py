"""Recipe validation: typed, every error at once, did-you-mean, overrides; all before weights load."""
import time
from pathlib import Path

import pytest
import yaml
from conftest import recipe_dict, tunesmith

from tunesmith.recipe import RecipeError, load

RECIPES = Path(__file__).parent.parent / "tunesmith" / "recipes"


def test_every_bundled_recipe_validates():
    files = sorted(RECIPES.glob("*.yaml"))
    assert files
    for f in files:
        load(f)


def test_all_errors_reported_at_once_with_did_you_mean():
    bad = {"task": "text-clasification", "model": "minilm", "data": {"train": "x.csv", "text_colum": "t"},
           "trian": {"epochs": 1}, "train": {"learning_rate": -1, "batch_size": "big"}}
    with pytest.raises(RecipeError) as e:
        load(bad)
    text = "\n".join(e.value.errors)
    assert len(e.value.errors) == 5, text
    assert "did you mean 'train'" in text
    assert "did you mean 'data.text_column'" in text
    assert "did you mean 'text-classification'" in text
    assert "train.learning_rate" in text and "train.batch_size" in text


def test_overrides_are_typed_and_reach_nested_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path, tmp_path / "x.csv")))
    r = load(path, ["train.learning_rate=3e-5", "train.epochs=2", "model.pretrained=false",
                    "adapt.freeze_patterns=[classifier.*]", "eval.before=true"])
    assert r.train.learning_rate == 3e-5 and r.train.epochs == 2
    assert r.model.pretrained is False and r.model.name == str(tmp_path)
    assert r.adapt.freeze_patterns == ["classifier.*"] and r.eval.before is True


def test_min_steps_default_is_the_tasks():
    """Classification trains at least 100 optimizer steps by default (the small-data evidence); causal-lm keeps
    its epochs; an explicit value wins."""
    base = {"model": "m", "data": {"train": "x.csv"}}
    assert load({**base, "task": "text-classification"}).train.min_steps == 100
    assert load({**base, "task": "image-classification"}).train.min_steps == 100
    assert load({**base, "task": "causal-lm"}).train.min_steps == 0
    assert load({**base, "task": "text-classification", "train": {"min_steps": 0}}).train.min_steps == 0


def test_missing_required_keys_listed():
    with pytest.raises(RecipeError) as e:
        load({"task": "text-classification"})
    assert {"model: required key is missing", "data: required key is missing"} <= set(e.value.errors)


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: text-classification\nmodel: [minilm\n")
    with pytest.raises(RecipeError) as e:
        load(path)
    assert "line" in e.value.errors[0]


def test_cli_misspelled_key_exits_2_before_loading_weights(tmp_path, tiny_bert, reviews):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_bert, reviews)))
    t = time.perf_counter()
    out = tunesmith("train", path, "trian.epochs=1", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "did you mean 'train'" in out.stderr
    assert not (tmp_path / "run").exists()          # nothing started
    assert "Loading weights" not in out.stderr
    assert time.perf_counter() - t < 20
