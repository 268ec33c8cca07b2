"""What one prediction is, per task family (`Task.prediction` names the kind): the JSON `Task.predict` returns for
one input, the response schema POST /v1/predict documents in /openapi.json, and what the serve page and the report
draw. Torch-free (pydantic only): the server's schema and the report read it without a model.

  label   {"label", "probabilities": {name: p}}                       bars of the probabilities
  spans   {"spans": [{"text", "start", "end", "label", "score"}]}      the input text with the spans highlighted;
                                                                       start/end: character offsets, end exclusive
  text    {"prompt", "output"}                                         the generated text (prompt: what it answers)
  boxes   {"boxes": [{"box": [x0, y0, x1, y1], "label", "score"}]}    a list, and the boxes drawn on the image;
                                                                       box: pixels of the input image, xyxy

A task may declare its own schema (`Task.output_schema`), a subclass of its kind's with more fields; the page and
the report still draw it by its kind.

samples.jsonl (written by a task's evaluate_final, read by the report): up to 20 examples of the test split.
text: {"prompt", "reference", "output"} (strings; a prompt may be a list of chat messages); spans, boxes:
{"input" (the text, or a description of the image), "reference", "output"}, both predictions of the kind's schema.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

KINDS = ("label", "spans", "text", "boxes")


class Prediction(BaseModel):
    """One input's prediction; exactly these fields (a task that returns others declares its own schema)."""
    model_config = ConfigDict(extra="forbid")


class LabelPrediction(Prediction):
    label: str = Field(description="the most probable label")
    probabilities: dict[str, float] = Field(description="label -> probability (each label of the model)")


class Span(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="the input's characters [start, end)")
    start: int = Field(ge=0, description="offset of the first character in the input text")
    end: int = Field(ge=0, description="offset after the last character")
    label: str
    score: float = Field(ge=0, le=1)


class SpansPrediction(Prediction):
    spans: list[Span] = Field(description="labelled spans of the input text, in text order")


class TextPrediction(Prediction):
    prompt: str = Field(description="what the text answers (a chat input: its last message)")
    output: str = Field(description="the generated text")


class Box(BaseModel):
    model_config = ConfigDict(extra="forbid")
    box: tuple[float, float, float, float] = Field(description="x0, y0, x1, y1 in pixels of the input image")
    label: str
    score: float = Field(ge=0, le=1)


class BoxesPrediction(Prediction):
    boxes: list[Box] = Field(description="detected objects, most confident first")


SCHEMAS: dict[str, type[Prediction]] = {"label": LabelPrediction, "spans": SpansPrediction, "text": TextPrediction,
                                        "boxes": BoxesPrediction}
