"""tunesmith tune: prints its plan, races candidates by successive halving, and never runs past the budget by
more than one evaluation."""
import time

from conftest import recipe_dict, tunesmith, write_reviews

import tunesmith as ts


def test_tune_stays_within_its_budget(tiny_bert, tmp_path):
    from tunesmith.selection.tune import tune

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


def test_a_failing_candidate_is_reported_and_the_race_goes_on(tiny_bert, tmp_path, monkeypatch):
    """A candidate that cannot run (here LoRA on modules the model lacks) is a failed row with its reason, not
    the end of tune; the first rung is a third of train.min_steps (40 train rows, batch 16: 3 steps per epoch,
    min_steps 30: plain 10 epochs, first rung ceil(10 / 3) = 4 epochs)."""
    import tunesmith.selection.tune as tune_mod

    def candidates(recipe, prof):
        return [("broken", {"adapt.method": "lora", "adapt.lora.target_modules": ["no_such_module"],
                            "train.min_steps": 0}),
                ("head-only", {"adapt.method": "freeze", "adapt.freeze_backbone": True, "train.min_steps": 0})]

    monkeypatch.setattr(tune_mod, "candidates", candidates)
    data = write_reviews(tmp_path / "r.csv", n=66)
    recipe = ts.load_recipe(recipe_dict(tiny_bert, data, train={"epochs": 1, "min_steps": 30}))
    lines = []
    out = tune_mod.tune(recipe, tmp_path / "tune", "120s", say=lines.append)
    text = "\n".join(lines)
    assert "plan: plain recipe (10 epochs), then 2 x 4 epochs" in text, text
    assert "tune: broken failed: " in text and "No modules were targeted" in text, text   # peft's own reason
    broken = [r for r in out["runs"] if r["name"] == "broken"]
    assert broken and broken[0]["score"] is None and broken[0]["stopped"].startswith("failed: ")
    assert out["best"]["name"] in ("plain", "head-only")
    assert out["runs"][0]["epochs"] == 10                             # the table shows what the plain run trained
    plain = ts.Run(out["runs"][0]["run_dir"]).history
    assert max(r["step"] for r in plain if "loss" in r and "split" not in r) == 30      # min_steps, not 1 epoch


def test_blocks_are_counted_as_freeze_layers_counts_them(tiny_bert):
    """tune names its 'top-2 of N' candidate from the model's repeated blocks: transformer layers, or the 16
    inverted-residual blocks of MobileNetV2, whose config has no num_hidden_layers."""
    from transformers import AutoConfig, MobileNetV2Config

    from tunesmith.selection.tune import count_blocks

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
