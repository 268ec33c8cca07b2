"""What tune reads before it plans: the data cut once into folder/data (every candidate sees the same rows, the
test rows reach no choice) and its profile (rows, classes, balance, tokens, model blocks, whether LoRA has modules
to wrap)."""
from __future__ import annotations

import statistics
from pathlib import Path

from tunesmith import io
from tunesmith.recipe import Recipe, load


def profile(recipe: Recipe, task, tables: dict) -> dict:
    """What the plan is drawn from: train rows, classes and their balance, tokens per example, model blocks, and
    whether LoRA has modules to wrap in the model (adapt.lora_targets: the recipe's target_modules, or PEFT's
    defaults for the config's model_type; a conv net has none). task: the recipe's Task, set up; tables: its rows
    per split (tunesmith.splits.load_data)."""
    from transformers import AutoConfig

    from tunesmith.adapt import lora_targets
    from tunesmith.assets.bundled import resolve_model

    rows = tables["train"].rows
    keys = [task.stratify_key(r) for r in rows]
    counts = {k: keys.count(k) for k in set(keys)} if keys and keys[0] is not None else {}
    sample = task.encode(rows[:200])
    config = AutoConfig.from_pretrained(resolve_model(recipe.model.name), revision=recipe.model.revision,
                                        trust_remote_code=recipe.model.trust_remote_code)
    return {"rows": len(rows), "classes": len(counts) or None,
            "balance": round(max(counts.values()) / min(counts.values()), 2) if counts else None,
            "tokens": statistics.median(task.length(f) for f in sample) if sample else None,
            "blocks": count_blocks(config, recipe.model.trust_remote_code),
            "lora": lora_targets(config.model_type, recipe.adapt.lora.target_modules)}


def count_blocks(config, trust_remote_code: bool) -> int | None:
    """Blocks as adapt.freeze_layers counts them (transformer layers, CNN stages), on a weightless skeleton."""
    import torch
    from transformers import AutoModel

    from tunesmith.adapt import find_blocks

    try:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:                               # an architecture AutoModel does not know: the config's count
        return getattr(config, "num_hidden_layers", None)
    name = find_blocks(skeleton)
    return len(skeleton.get_submodule(name)) if name else None


def split_once(recipe: Recipe, folder: Path) -> tuple[Recipe, Recipe, object, dict]:
    """The recipe's rows cut once, written to folder/data: every candidate trains, validates and is tested on the
    same rows whatever its seed (a seed also cuts the splits), and the test rows never reach a choice.
    Returns (the recipe on train/validation/test, the refit's recipe on train + validation as its train rows,
    the task (set up), the rows per split)."""
    from tunesmith.splits import load_data
    from tunesmith.tasks import get_task

    task = get_task(recipe)
    task.setup()
    tables = load_data(task, recipe).tables
    data = folder / "data"
    for split in ("train", "validation", "test"):
        io.write_jsonl(data / f"{split}.jsonl", tables[split].rows)
    io.write_jsonl(data / "refit.jsonl", tables["train"].rows + tables["validation"].rows)
    base = {**recipe.dump(), "search": None}

    def on(train: str) -> Recipe:
        return load({**base, "data": {**base["data"], "train": str(data / train), "max_rows": None,
                                      "validation": str(data / "validation.jsonl"), "max_eval_rows": None,
                                      "test": str(data / "test.jsonl")}})

    return on("train.jsonl"), on("refit.jsonl"), task, tables
