"""Old run folders still load: a schema-1 run (before run.json existed, commit 647732d) and a schema-2 run (the last
commit before the package was reorganised, 89b5cfe), both written by that old code, predict and evaluate today
as they did then. The folders and the old code's outputs are static fixtures (tests/fixtures/legacy/, rebuilt
with make_fixtures.py there); no old code runs here."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import tunesmith as ts

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def close(got, want, tol: float, where: str = "eval") -> None:
    """Every value of `want` is in `got`: numbers within `tol`, everything else equal."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for key, value in want.items():
            assert key in got, f"{where}.{key} missing"
            close(got[key], value, tol, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, tol, f"{where}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=0, abs_tol=tol), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture(params=["schema1", "schema2"])
def legacy(request, tmp_path):
    expected = json.loads((LEGACY / f"{request.param}.expected.json").read_text())
    return ts.Run(shutil.copytree(LEGACY / request.param, tmp_path / request.param)), expected


def test_old_run_folder_recipe_migrates(legacy):
    run, expected = legacy
    assert run.schema == expected["schema"]
    recipe = run.recipe                  # schema 1 holds every task's keys (image_column, lora, augment, ...)
    assert recipe.task == "text-classification" and recipe.name == run.path.name
    assert (recipe.train.max_steps, recipe.train.learning_rate, recipe.data.max_length) == (2, 3e-3, 16)
    assert "augment" not in recipe.dump() and "image_column" not in recipe.dump()["data"]


def test_old_run_folder_predicts_and_evaluates_as_before(legacy):
    run, expected = legacy
    model = run.load(device="cpu")
    got = model.predict(expected["inputs"])
    assert [g["label"] for g in got] == [w["label"] for w in expected["predictions"]]
    assert len({round(w["probabilities"]["pos"], 2) for w in expected["predictions"]}) > 1   # not a constant
    for g, w in zip(got, expected["predictions"]):
        assert set(g["probabilities"]) == set(w["probabilities"])
        close(g["probabilities"], w["probabilities"], 1e-5, "probabilities")
    close(model.evaluate(), expected["eval"], 1e-6)
