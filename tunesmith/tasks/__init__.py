"""The task table: the one place where a task name becomes code.

Each entry names a task's recipe class ("module:Class", torch-free), which names its Task class in turn
(`Recipe.task_class`), so reading a recipe never imports torch; `get_task` imports the task's module on first
use. Tasks from outside the package join with one call, `register_task(MyRecipe)`, or through an entry point in
the group "tunesmith.tasks" whose value is the recipe class ("my_pkg.schema:MyRecipe"); they then validate,
train, evaluate and predict like the built-in ones.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN: dict[str, str] = {
    "text-classification": "tunesmith.tasks.schema:TextClassificationRecipe",
    "causal-lm": "tunesmith.tasks.schema:CausalLMRecipe",
    "image-classification": "tunesmith.tasks.schema:ImageClassificationRecipe",
    "token-classification": "tunesmith.tasks.tagging:TokenClassificationRecipe",
    "text2text": "tunesmith.tasks.text2text_schema:Text2TextRecipe",
    "pretrain-causal": "tunesmith.tasks.pretrain_schema:CausalPretrainRecipe",
    "pretrain-masked": "tunesmith.tasks.pretrain_schema:MaskedPretrainRecipe",
    "object-detection": "tunesmith.tasks.detection_schema:DetectionRecipe",
}
_registered: dict[str, object] = {}            # name -> recipe class (register_task)


def _load(ref):
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def register_task(recipe_cls, name: str | None = None) -> None:
    """Make a task available to recipes: `recipe_cls` subclasses tunesmith.Recipe with `task: Literal[name]`
    and `task_class` naming (or being) its Task subclass."""
    from pydantic import BaseModel  # not tunesmith.recipe: that module reads this table (no import cycle)

    if not (isinstance(recipe_cls, type) and issubclass(recipe_cls, BaseModel) and "task" in recipe_cls.model_fields):
        raise TypeError(f"register_task takes a subclass of tunesmith.Recipe, got {recipe_cls!r}")
    _registered[name or recipe_cls.task_name()] = recipe_cls


def recipe_classes() -> dict[str, type]:
    """Every known task's recipe class: built-in, then entry points, then registered (later ones win)."""
    table = {name: _load(ref) for name, ref in BUILTIN.items()}
    for ep in entry_points(group="tunesmith.tasks"):
        table[ep.name] = ep.load()
    table.update(_registered)
    return table


def task_class(recipe) -> type:
    """The Task class of a validated recipe (Recipe.task_for: its task_class, or one its keys choose)."""
    return _load(recipe.task_for())


def get_task(recipe, pad_multiple: int = 1):
    """A Task instance for this recipe (nothing loaded yet: see Task's lifecycle in tunesmith/tasks/base.py).
    pad_multiple: collate rounds batch widths up to it (training on GPUs: 16)."""
    return task_class(recipe)(recipe, pad_multiple)
