"""The recipe: a typed, validated description of one fine-tuning run.

Loading never imports torch and never touches weights, so every mistake in a recipe is reported (all of
them at once, with a did-you-mean for misspelled keys) before anything slow happens.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.tasks import TASK_NAMES


class RecipeError(Exception):
    """A recipe that cannot run; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, errors
        super().__init__(f"{source}: {len(errors)} error(s) in recipe\n" + "\n".join(f"  - {e}" for e in errors))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str                                   # bundled alias, HF hub id, or local folder
    pretrained: bool = True                     # false: same architecture, random weights (baseline)
    dropout: float | None = Field(None, ge=0, lt=1)  # overrides every dropout probability in the config
    revision: str | None = None


class DataConfig(Section):
    train: str                                  # file (.csv .jsonl .parquet), bundled alias, HF dataset
    validation: str | None = None               # None: stratified split from train
    test: str | None = None                     # None: stratified split from train
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    messages_column: str = "messages"           # chat data: list of {role, content}
    prompt_column: str = "prompt"
    response_column: str = "response"
    labels: list[str | int] | None = None       # label order; None: sorted labels seen in train
    validation_size: float = Field(0.1, gt=0)   # fraction (<1) or row count (>=1) split from train
    test_size: float = Field(0.1, gt=0)
    max_rows: int | None = Field(None, gt=0)    # cap on train rows (after the split), for quick runs
    max_length: int = Field(128, gt=0)          # tokens; longer inputs are truncated and counted
    bad_rows: Literal["error", "skip"] = "error"


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None     # None: peft's default for the architecture


class AdaptConfig(Section):
    method: Literal["full", "freeze", "lora"] = "full"
    freeze_embeddings: bool = False
    freeze_layers: int = Field(0, ge=0)         # first N blocks of the backbone
    freeze_patterns: list[str] = []             # fnmatch globs on parameter names
    freeze_backbone: bool | None = None         # None: true for method=freeze without other specs
    gradual_unfreeze: int = Field(0, ge=0)      # unfreeze one more block (top down) every N epochs
    layer_lr_decay: float = Field(1.0, gt=0, le=1)  # lr x decay^(depth from the head); 1 = off
    lora: LoraConfig = LoraConfig()


class TrainConfig(Section):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)   # overrides epochs when set
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.06, ge=0)           # fraction (<1) of steps, or steps (>=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["balanced"] | list[float] | dict[str, float] | None = None
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    group_by_length: bool = True
    eval_every: int | None = Field(None, gt=0)  # optimizer steps; None: once per epoch
    save_every: int | None = Field(None, gt=0)  # optimizer steps; None: at each evaluation
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    metric: str | None = None                   # best checkpoint / early stopping; None: the task's
    patience: int | None = Field(None, gt=0)    # evaluations without improvement; None: no early stop
    compile: bool = False


class EvalConfig(Section):
    before: bool = False                        # also evaluate the model before fine-tuning
    batch_size: int = Field(64, gt=0)
    generate: dict[str, Any] | None = None      # generation settings for generative tasks


class Recipe(Section):
    task: str
    model: ModelConfig
    data: DataConfig
    name: str | None = None                     # run folder prefix; default: the task
    adapt: AdaptConfig = AdaptConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_from_string(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v):
        if v not in TASK_NAMES:
            close = difflib.get_close_matches(v, TASK_NAMES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown task '{v}': {hint}choose one of {', '.join(TASK_NAMES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.adapt.method == "freeze" and self.adapt.freeze_backbone is None:
            specs = self.adapt.freeze_embeddings or self.adapt.freeze_layers or self.adapt.freeze_patterns
            self.adapt.freeze_backbone = not specs
        return self

    def dump(self) -> dict:
        return self.model_dump(mode="json")


# --- loading, overrides, error messages -------------------------------------------------------------

def _fields_at(loc: tuple) -> list[str]:
    """Valid key names of the section that `loc` (a pydantic error location) points into."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model else []


def _messages(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            out.append(f"{path}: unknown key;{hint} valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            out.append(f"{path}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{path}: {msg} (got {e.get('input')!r})")
    return out


def apply_override(data: dict, override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (3e-5, true, [a, b])."""
    if "=" not in override:
        raise RecipeError("command line", [f"override '{override}' must look like key.path=value"])
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if isinstance(node.get(part), str) and part == "model":
            node[part] = {"name": node[part]}      # `model: minilm` then `model.pretrained=false`
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError("command line", [f"override '{override}': '{part}' is not a section"])
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def load(path: str | Path | dict, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    if isinstance(path, dict):
        source, data = "recipe", dict(path)
    else:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise RecipeError(source, [f"file not found: {path}"]) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise RecipeError(source, [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if not isinstance(data, dict):
        raise RecipeError(source, ["a recipe is a YAML mapping (task:, model:, data:, ...)"])
    for o in overrides:
        apply_override(data, o)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(source, _messages(e)) from None
