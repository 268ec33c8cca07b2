"""The real bundled MiniLM on real Rotten Tomatoes snippets (slow: about a minute on 2 cores)."""
import json

import pytest
from conftest import tunesmith

from tunesmith.pipeline import train
from tunesmith.recipe import load

pytestmark = pytest.mark.slow


def test_minilm_learns_sentiment_and_pipeline_agrees(tmp_path):
    from transformers import pipeline

    recipe = load({"task": "text-classification", "model": "minilm",
                   "data": {"train": "rotten_tomatoes", "max_rows": 2000, "test_size": 400, "validation_size": 200,
                            "max_length": 64},
                   "train": {"epochs": 1, "learning_rate": 1e-4, "batch_size": 32},
                   "eval": {"before": True}})
    run = train(recipe, run_dir=tmp_path / "run")
    result = json.loads((run.path / "eval.json").read_text())
    assert result["n_examples"] == 400
    assert result["accuracy"] > 0.70 and result["accuracy"] > result["before"]["accuracy"] + 0.1
    assert result["f1_macro"] > 0.65

    texts = [json.loads(x)["text"] for x in (run.path / "data" / "test.jsonl").read_text().splitlines()[:24]]
    pipe = pipeline("text-classification", model=str(run.path / "model"))
    expected = [r["label"] for r in pipe(texts)]
    (tmp_path / "in.txt").write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    out = tunesmith("predict", run.path, "--input", tmp_path / "in.txt")
    assert out.returncode == 0, out.stderr
    assert [json.loads(x)["label"] for x in out.stdout.splitlines()] == expected
    assert set(expected) <= {"fresh", "rotten"}
