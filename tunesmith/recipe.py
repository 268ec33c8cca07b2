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
    train: str                                  # file (.csv .jsonl .parquet, IDX), image folder, bundled alias, HF dataset
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
    max_eval_rows: int | None = Field(None, gt=0)  # cap on validation and test rows each (stratified subset)
    image_size: int | None = Field(None, gt=0)  # pixels, square model input; None: the model's image processor
    max_length: int = Field(128, gt=0)          # tokens; longer inputs are truncated and counted
    bad_rows: Literal["error", "skip"] = "error"
    chat_template: str | None = None            # Jinja chat template (causal-lm); None: the tokenizer's own


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None     # None: peft's default for the architecture


class AdaptConfig(Section):
    method: Literal["full", "freeze", "lora"] | None = None  # None: the task's default (Task.default_method)
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
    pad_multiple: int | None = Field(None, gt=0)  # pad batch widths to a multiple; None: 16 on GPU, 1 on CPU
    eval_every: int | None = Field(None, gt=0)  # optimizer steps; None: once per epoch
    save_every: int | None = Field(None, gt=0)  # optimizer steps; None: at each evaluation
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    metric: str | None = None                   # best checkpoint / early stopping; None: the task's
    patience: int | None = Field(None, gt=0)    # evaluations without improvement; None: no early stop
    compile: bool = False
    packing: bool = False                       # causal-lm: several examples per row, none attends across
    pack_length: int | None = Field(None, gt=0)  # tokens per packed row; None: data.max_length


class AugmentConfig(Section):
    """Training-time image augmentation (image tasks), drawn per image from the run's seeded RNG."""
    crop_scale: tuple[float, float] | None = None  # random resized crop: area fraction range, e.g. [0.5, 1]; None: off
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio (width / height) range
    hflip: float = Field(0.0, ge=0, le=1)       # probability of a horizontal flip
    vflip: float = Field(0.0, ge=0, le=1)       # probability of a vertical flip
    rotation: float = Field(0.0, ge=0, le=180)  # degrees; uniform in [-rotation, rotation]
    brightness: float = Field(0.0, ge=0, lt=1)  # factor uniform in [1 - x, 1 + x]
    contrast: float = Field(0.0, ge=0, lt=1)    # factor uniform in [1 - x, 1 + x]
    saturation: float = Field(0.0, ge=0, lt=1)  # factor uniform in [1 - x, 1 + x]
    hue: float = Field(0.0, ge=0, le=0.5)       # shift in turns, uniform in [-x, x]
    policy: Literal["none", "randaugment", "trivialaugment"] = "none"
    num_ops: int = Field(2, ge=1)               # randaugment: ops per image
    magnitude: int = Field(9, ge=0, le=30)      # randaugment: strength on torchvision's 0..30 scale
    mixup: float = Field(0.0, ge=0)             # MixUp Beta(alpha, alpha); 0: off
    cutmix: float = Field(0.0, ge=0)            # CutMix Beta(alpha, alpha); 0: off
    mix_prob: float = Field(1.0, ge=0, le=1)    # probability that a batch is mixed (MixUp or CutMix, 50/50 if both)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, v):
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError("a range [low, high] with 0 < low <= high")
        return v

    @property
    def enabled(self) -> bool:
        return bool(self.crop_scale or self.hflip or self.vflip or self.rotation or self.brightness
                    or self.contrast or self.saturation or self.hue or self.policy != "none"
                    or self.mixup or self.cutmix)


class EvalConfig(Section):
    before: bool = False                        # also evaluate the model before fine-tuning
    batch_size: int = Field(64, gt=0)
    generate: dict[str, Any] | None = None      # generation settings for generative tasks
                                                # (causal-lm: model.generate kwargs, e.g. max_new_tokens: 8)


class DoctorConfig(Section):
    near_method: Literal["auto", "text", "embedding"] = "auto"  # auto: text when the task has Task.key, else embedding
    near_threshold: float | None = Field(None, gt=0, le=1)      # None: 0.8 Jaccard of char 5-grams; 0.95 cosine
    label_noise: bool = True                    # cross-validated search for wrong labels on the model's embeddings
    folds: int = Field(5, ge=2)                 # cross-validation folds for the label-noise model
    imbalance_ratio: float = Field(3.0, gt=1)   # largest / smallest train class count above which train is skewed
    listed: int = Field(20, gt=0)               # rows shown per finding on the terminal (doctor.json has all)


class Recipe(Section):
    task: str
    model: ModelConfig
    data: DataConfig
    name: str | None = None                     # run folder prefix; default: the task
    adapt: AdaptConfig = AdaptConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    eval: EvalConfig = EvalConfig()
    doctor: DoctorConfig = DoctorConfig()

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
