"""tunesmith tune: prints its plan, races candidates by successive halving, and never runs past the budget by
more than one evaluation."""
import time

import tunesmith as ts
from conftest import recipe_dict, tunesmith, write_reviews


def test_tune_stays_within_its_budget(tiny_bert, tmp_path):
    from tunesmith.tune import tune

    data = write_reviews(tmp_path / "r.csv", n=400)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 1000, "batch_size": 8}))
    lines = []
    t0 = time.monotonic()
    out = tune(recipe, tmp_path / "tune", "8s", say=lines.append)
    elapsed = time.monotonic() - t0
    text = "\n".join(lines)
    assert lines[1].startswith("plan: plain recipe (1000 epochs), then 5 x 1 epochs") and "estimated" in lines[1]
    evals = []                                                # seconds of one validation, per run
    for row in out["runs"]:
        history = ts.Run(row["run_dir"]).history
        n = sum(r.get("split") == "validation" for r in history)
        evals += [r["eval_seconds"] / max(n, 1) for r in history if r.get("summary")]
    # the plain recipe (1000 epochs) cannot finish in 8 s: it is stopped by the budget, after one evaluation
    assert out["runs"][0]["name"] == "plain" and out["runs"][0]["stopped"] == "time budget spent"
    print(f"budget 8 s, spent {elapsed:.2f} s, one validation {max(evals):.3f} s")
    assert elapsed <= 8 + max(evals) + 1.5, (elapsed, text)   # + saving the model and the final test evaluation
    assert "best vs plain recipe" in text or "skipping" in text
    assert (tmp_path / "tune" / "tune.json").exists()


def test_tune_races_candidates_and_writes_best_yaml(tiny_bert, tmp_path):
    data = write_reviews(tmp_path / "r.csv", n=120)
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_bert, data, train={"epochs": 1})))
    res = tunesmith("tune", path, "--budget", "60s", "--dir", tmp_path / "tune")
    assert res.returncode == 0, res.stderr
    assert "plan:" in res.stdout and "head-only" in res.stdout and "best vs plain recipe" in res.stdout
    assert "feature cache: on" in res.stdout                          # head-only trains on cached features
    assert ts.load_recipe(tmp_path / "tune" / "best.yaml").search is None
