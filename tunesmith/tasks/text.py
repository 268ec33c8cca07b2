"""What the tokenizer tasks share (text and token classification, causal LM, text2text, pretraining): the processor
is a tokenizer, and an example is cut at (or windowed by) data.max_length tokens."""
from __future__ import annotations

from tunesmith.tasks.base import Task, blank


class Tokenized(Task):
    """A Task whose processor is a tokenizer; list it before the task's other bases. A task whose tokenizer needs
    checks or settings (a chat template, a fast tokenizer) overrides load_processor."""

    @property
    def tokenizer(self):
        return self.processor

    @property
    def max_length(self) -> int:
        return self.recipe.data.max_length

    def load_processor(self, source, revision):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=self.trust_remote_code)


def text_problem(text, column: str) -> str | None:
    """Why `text` (a row's `column`, or a bare input) cannot be used as a text, or None."""
    if text is None:
        return f"missing text (column '{column}')"
    if not isinstance(text, str):
        return f"text has the wrong type ({type(text).__name__}), expected a string"
    if blank(text):
        return "empty text"
    return None
