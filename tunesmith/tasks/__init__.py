"""The task table: the one place where a task name becomes code.

Entries are "module:Class" strings so that reading a recipe does not import torch; `get_task` imports
the task's module on first use. A task subclasses `tunesmith.tasks.base.Task`.
"""
from __future__ import annotations

import importlib

TASKS: dict[str, str] = {
    "text-classification": "tunesmith.tasks.text_classification:TextClassification",
    "causal-lm": "tunesmith.tasks.causal_lm:CausalLM",
    "image-classification": "tunesmith.tasks.image_classification:ImageClassification",
}
TASK_NAMES = list(TASKS)


def get_task(recipe):
    """A Task instance for this recipe."""
    module, _, cls = TASKS[recipe.task].partition(":")
    return getattr(importlib.import_module(module), cls)(recipe)
