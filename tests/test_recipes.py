"""Every shipped recipe (tunesmith/recipes/*.yaml) trains a few steps with all its keys as written, on tiny
stand-ins for its model and data (the real ones are the slow tests' and the demos')."""
from pathlib import Path

import pytest

import tunesmith as ts

RECIPES = sorted((Path(__file__).parent.parent / "tunesmith" / "recipes").glob("*.yaml"))


def stand_ins(task: str, tmp: Path, tiny_bert: Path) -> list[str]:
    """Overrides pointing a recipe at a tiny model and generated data of its task, and sizes that fit them."""
    if task == "text-classification":
        from conftest import write_reviews
        return [f"model.name={tiny_bert}", f"data.train={write_reviews(tmp / 'r.csv', n=120)}",
                "data.validation_size=20", "data.test_size=20", "data.max_rows=null"]
    if task == "causal-lm":
        from test_causal_lm import build_tiny_llama, write_chats
        model = build_tiny_llama(tmp / "llama")
        return [f"model.name={model}", f"data.train={write_chats(tmp / 'c.jsonl', n=60)}", "data.test_size=8",
                "data.validation_size=8", "data.max_rows=null", "adapt.freeze_layers=1",
                "adapt.lora.target_modules=[q_proj, v_proj]"]
    if task == "image-classification":
        from test_image_classification import idx_files, save_processor, tiny_model
        model = tmp / "resnet"
        tiny_model("resnet", num_labels=10).save_pretrained(model)
        save_processor(model)
        (tmp / "idx").mkdir()
        return [f"model.name={model}", f"data.train={idx_files(tmp / 'idx', n=90)}", "data.test=null",
                "data.validation_size=15", "data.test_size=15", "data.max_rows=null", "data.image_size=32"]
    if task == "token-classification":
        from test_token_classification import sentences, write_jsonl
        rows = [{"tokens": tokens, "tags": tags} for tokens, tags in sentences(80)]
        return [f"model.name={tiny_bert}", f"data.train={write_jsonl(tmp / 't.jsonl', rows)}",
                "data.validation_size=15", "data.test_size=15", "data.max_rows=null"]
    if task in ("pretrain-causal", "pretrain-masked"):
        from test_pretrain import write_text
        model = tiny_bert
        if task == "pretrain-causal":
            from test_causal_lm import build_tiny_llama
            model = build_tiny_llama(tmp / "llama")
        return [f"model.name={model}", f"data.train={write_text(tmp / 't.txt', n=60)}", "data.validation_size=8",
                "data.test_size=8", "data.max_rows=null", "data.max_length=32", "adapt.lora.target_modules=[q_proj]"]
    raise AssertionError(f"no stand-ins for task {task}: add them here")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_trains_on_tiny_stand_ins(path, tiny_bert, tmp_path):
    task = ts.load_recipe(path).task
    recipe = ts.load_recipe(path, stand_ins(task, tmp_path, tiny_bert) + ["train.max_steps=2", "eval.before=false"])
    run = ts.train(recipe, run_dir=tmp_path / "run")
    assert [r["step"] for r in run.history if r.get("summary")] == [2]
    assert run.metrics and (run.path / "model" / "config.json").exists()
