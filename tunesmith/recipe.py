"""The recipe: a typed, validated description of one fine-tuning run.

Shared sections live here; each task declares its own recipe class (a subclass of `Recipe` with its task's
extra keys, metrics and defaults; built-ins in tunesmith/tasks/schema.py) and the table in
tunesmith/tasks/__init__.py picks it by the `task` key: a union discriminated on `task`. A key that only another
task uses is an error naming that task; a misspelled key gets a did-you-mean. Loading never imports torch and
never touches weights, so every mistake is reported, all at once, before anything slow happens.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import TunesmithError
from tunesmith.recipe_errors import QUOTE, messages, section_type, short
from tunesmith.selection.space import SearchConfig, seconds

SCHEMA = 2                      # run folder / recipe layout version; 1: one flat namespace for every task
MAX_NAME = 100                  # characters of `name` (a run folder's prefix, copied into every run's recipe)


@dataclass
class Guess:
    """What a task's recipe class makes of some data (`Recipe.sniff`, read by `tunesmith init`)."""
    score: float                                # 0..1: ~0.9 the data is in one of the task's own formats
    data: dict = field(default_factory=dict)    # data keys to write besides data.train (columns, splits, scheme)
    about: list[str] = field(default_factory=list)  # the data's profile, one comment line each (counts, lengths)
    notes: list[str] = field(default_factory=list)  # commented-out suggestions written at the end of the recipe
    ambiguous: str | None = None                # set: the user must choose (the candidates, and the options)


class RecipeError(TunesmithError):
    """A recipe that cannot run; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source, self.errors = source, errors
        super().__init__(f"{source}: {len(errors)} error(s) in recipe\n" + "\n".join(f"  - {e}" for e in errors))


class UsageError(RecipeError):
    """A bad value on the command line or in an API call's arguments (a budget, a storage URL): one line (exit 2,
    as recipe errors)."""

    def __init__(self, message: str):
        self.source, self.errors = "command line", [message]
        TunesmithError.__init__(self, message)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str                                   # bundled alias, HF hub id, or local folder
    pretrained: bool = True                     # false: same architecture, random weights (baseline)
    dropout: float | None = Field(None, ge=0, lt=1)  # overrides every dropout probability in the config
    revision: str | None = None
    trust_remote_code: bool = False             # run the model folder's own Python code (auto_map); only if trusted


class DataConfig(Section):
    """Keys every task reads; a task's recipe adds its own (columns, lengths, sizes)."""
    train: str                                  # file (.csv .jsonl .parquet, IDX), image folder, alias, HF dataset
    validation: str | None = None               # None: split from train (stratified where the task has labels)
    test: str | None = None                     # None: split from train
    validation_size: float = Field(0.1, gt=0)   # fraction (<1) or row count (>=1) split from train
    test_size: float = Field(0.1, gt=0)
    max_rows: int | None = Field(None, gt=0)    # cap on train rows (after the split), for quick runs
    max_eval_rows: int | None = Field(None, gt=0)  # cap on validation and test rows each (stratified subset)
    bad_rows: Literal["error", "skip"] = "error"
    group_column: str | None = None             # cv folds keep rows sharing this value (speaker, patient) together


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None     # None: peft's default for the architecture


class AdaptConfig(Section):
    method: Literal["full", "freeze", "lora"] | None = None  # None: the task's default (Recipe.default_method)
    freeze_embeddings: bool = False
    freeze_layers: int = Field(0, ge=0)         # first N blocks of the backbone
    freeze_patterns: list[str] = []             # fnmatch globs on parameter names
    freeze_backbone: bool | None = None         # None: true for method=freeze without other specs
    gradual_unfreeze: int = Field(0, ge=0)      # unfreeze one more block (top down) every N epochs
    layer_lr_decay: float = Field(1.0, gt=0, le=1)  # lr x decay^(depth from the head); 1 = off
    lora: LoraConfig = LoraConfig()


class TrainConfig(Section):
    # "auto": until validation `metric` stops improving (patience), at most max_epochs / budget, then the best
    # checkpoint; a number: exactly that many epochs (tunesmith/defaults.py, README "How long to train")
    epochs: float | Literal["auto"] = "auto"
    max_epochs: float = Field(20, gt=0)         # epochs: auto's cap; its learning-rate schedule runs over it
    budget: str | None = None                   # wall time of training, e.g. "10m"; it stops there (any epochs)
    max_steps: int | None = Field(None, gt=0)   # overrides epochs when set: exactly this many optimizer steps
    min_steps: int = Field(0, ge=0)             # epochs: auto does not stop early before this many optimizer
                                                # steps (small data); a number of epochs is never raised by it
    learning_rate: float | None = Field(None, gt=0)  # None: the task's rate for adapt.method, set at training start
    batch_size: int | None = Field(None, gt=0)  # None: from the training examples, set at training start
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.06, ge=0)           # fraction (<1) of steps, or steps (>=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    group_by_length: bool = True
    pad_multiple: int | None = Field(None, gt=0)  # pad batch widths to a multiple; None: 16 on GPU, 1 on CPU
    eval_every: int | None = Field(None, gt=0)  # optimizer steps; None: once per epoch (epochs: auto: by data size)
    save_every: int | None = Field(None, gt=0)  # optimizer steps; None: at each evaluation
    keep_checkpoints: int = Field(2, ge=1)
    keep: Literal["best", "last"] = "best"      # the weights a run ends with: its best validation checkpoint, or
                                                # the last step's (tune's refit, whose validation rows it trains on)
    log_every: int = Field(10, gt=0)
    metric: str | None = None                   # best checkpoint / early stopping: one of the task's metrics
    patience: int | None = Field(None, gt=0)    # evaluations without improvement; None: no early stop
                                                # (epochs: auto: two epochs' evaluations, at least 3)
    min_delta: float | None = Field(None, ge=0)  # epochs: auto: the least gain of `metric` that is an improvement;
                                                # None: half a validation row (accuracy...), 0.01 for a loss
    compile: bool = False                       # torch.compile the model (in place: checkpoints keep their names)
    fast_dropout: bool = True                   # CPU: dropout masks from a cheaper generator (tunesmith/dropout.py)
    feature_cache: bool = True                  # frozen bottom blocks, no dropout there: compute their output once
    threads: int | None = Field(None, gt=0)     # torch threads on CPU; None: free cores (affinity, quota, load)
    report_to: list[Literal["tensorboard", "mlflow"]] = []  # trackers that get every metrics.jsonl record,
                                                # the recipe and eval.json (tunesmith/insight/tracking.py)
    mlflow_uri: str | None = None               # MLflow tracking URI; None: sqlite:///<run>/mlflow.db
    max_bad_steps: int = Field(10, ge=1)        # steps in a row with a non-finite loss/gradient before stopping

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs(cls, v):
        if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("is 'auto' (until validation stops improving) or a number of epochs above 0")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        try:
            v is None or seconds(v)
        except ValueError:
            raise ValueError("is a wall time such as 90s, 10m or 1.5h") from None
        return v


class EvalConfig(Section):
    before: bool = False                        # also evaluate the model before fine-tuning
    batch_size: int = Field(64, gt=0)


class DoctorConfig(Section):
    near_method: Literal["auto", "text", "embedding"] = "auto"  # auto: text when the task has Task.key, else embedding
    near_threshold: float | None = Field(None, gt=0, le=1)      # None: 0.8 Jaccard of char 5-grams; 0.95 cosine
    label_noise: bool = True                    # cross-validated search for wrong labels on the model's embeddings
    folds: int = Field(5, ge=2)                 # cross-validation folds for the label-noise model
    imbalance_ratio: float = Field(3.0, gt=1)   # largest / smallest train class count above which train is skewed
    listed: int = Field(20, gt=0)               # rows shown per finding on the terminal (doctor.json has all)


class Recipe(Section):
    """The sections every task has. A task's recipe subclasses this: `task: Literal["its-name"]`, its own
    section classes, and the class variables below; it may override tune_metric() and search_space() (what
    `tune` scores candidates on and which candidates it races)."""
    task_class: ClassVar[str] = ""              # "module:Class" of the Task; imported only when training
    # what evaluate() reports, and which way is better
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = {"loss": "min"}
    default_metric: ClassVar[str] = "loss"      # train.metric when unset
    default_method: ClassVar[str] = "full"      # adapt.method when unset
    # `tunesmith init`: (bundled alias, hub id written instead when the alias's package is not installed)
    starter_model: ClassVar[tuple[str, str] | None] = None
    # train.learning_rate when unset, by what trains: the whole model ("full", also freeze with some blocks
    # left to train), LoRA adapters ("lora"), a new head alone ("head": freeze_backbone); sources in
    # tunesmith/defaults.py
    learning_rates: ClassVar[dict[str, float]] = {"full": 5e-5, "lora": 2e-4, "head": 1e-3}

    task: str
    model: ModelConfig
    data: DataConfig
    name: str | None = None                     # run folder prefix; default: the task
    adapt: AdaptConfig = AdaptConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    doctor: DoctorConfig = DoctorConfig()
    search: SearchConfig | None = None          # `search` / `tune` (tunesmith/selection/space.py); None: defaults

    @model_validator(mode="before")
    @classmethod
    def _model_from_string(cls, data):
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        return data

    @model_validator(mode="after")
    def _resolve(self):
        """Fill the task's defaults, so the run's recipe.yaml says what ran; reject a metric the task lacks."""
        if self.adapt.method is None:
            self.adapt.method = self.default_method
        if self.adapt.method == "freeze" and self.adapt.freeze_backbone is None:
            specs = self.adapt.freeze_embeddings or self.adapt.freeze_layers or self.adapt.freeze_patterns
            self.adapt.freeze_backbone = not specs
        if self.train.metric is None:
            self.train.metric = self.default_train_metric()
        return self

    def default_train_metric(self) -> str:
        """train.metric when unset: the class's default_metric; a task may choose by the recipe (causal-lm with
        eval.generate under epochs: auto: exact match)."""
        return self.default_metric

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name):
        """A run folder's prefix: one plain name, so the run stays inside the runs folder."""
        if name is not None and len(name) > MAX_NAME:
            raise ValueError(f"is {len(name)} characters long: a run folder's prefix has at most {MAX_NAME}")
        if name is not None and (not name.strip() or "/" in name or "\\" in name or name in (".", "..")
                                 or Path(name).is_absolute()):
            raise ValueError("must be a plain folder name without path separators; choose where the run goes "
                             "with --run-dir")
        return name

    @field_validator("train")
    @classmethod
    def _known_metric(cls, train):
        """train.metric must be one the task reports (checked with the other fields: every error at once)."""
        if train.metric is not None and train.metric not in cls.metrics:
            close = difflib.get_close_matches(train.metric[:QUOTE], list(cls.metrics), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"train.metric {short(train.metric)} is not a metric of task '{cls.task_name()}': {hint}"
                             f"choose one of {', '.join(cls.metrics)}")
        return train

    @classmethod
    def sniff(cls, profile) -> Guess | None:
        """`tunesmith init`: how well `profile` (tunesmith/starter.py's Profile: a data file's rows or lines, or an
        image folder's files, read without torch) fits this task, with the keys to write; None: not at all. Each
        task recognises its own formats here, so init's shared code never names a task."""
        return None

    def task_for(self):
        """The Task class ("module:Class", or the class) for this recipe: `task_class`, unless a task's keys choose
        another (causal-lm's train.objective dpo / orpo)."""
        return type(self).task_class

    @classmethod
    def task_name(cls) -> str:
        """The task name this recipe class is for (its `task: Literal[...]`)."""
        return cls.model_fields["task"].annotation.__args__[0]

    @property
    def direction(self) -> Literal["max", "min"]:
        """Which way train.metric improves."""
        return self.metrics[self.train.metric]

    def tune_metric(self) -> tuple[str, Literal["max", "min"]]:
        """(metric, direction) `tune` scores candidates on: train.metric. A task whose validation metric is not what
        the user judges by may name one of its final evaluation's metrics instead (causal-lm: exact match)."""
        return self.train.metric, self.direction

    def search_space(self, blocks: int | None, learning_rate: float, lora: bool = True) -> list[tuple[str, dict]]:
        """`tune`'s candidates: (name, recipe keys), raced on epochs; cheapest first. blocks: the model's repeated
        blocks (None: unknown); learning_rate: the plain recipe's rate as it ran; lora: whether LoRA has modules
        to wrap in this model (adapt.lora_targets). A task overrides this with the space that suits it; this
        default suits a pretrained backbone with a new head: head only (on cached features), the top two blocks,
        full fine-tuning at the recipe's rate and 3x, and LoRA where the model has LoRA targets."""
        blocks = blocks or 6
        lr = learning_rate
        out = [("head-only", {"adapt.method": "freeze", "adapt.freeze_backbone": True, "model.dropout": 0.0,
                              "train.learning_rate": 2e-3, "train.scheduler": "constant"}),
               (f"top-2 of {blocks}", {"adapt.method": "full", "adapt.freeze_backbone": False,
                                       "adapt.freeze_embeddings": True, "adapt.freeze_layers": max(blocks - 2, 0),
                                       "model.dropout": 0.0, "train.learning_rate": 4 * lr}),
               (f"full lr {lr:g}", {"adapt.method": "full", "train.learning_rate": lr}),
               (f"full lr {3 * lr:g}", {"adapt.method": "full", "train.learning_rate": 3 * lr}),
               ("lora r16", {"adapt.method": "lora", "adapt.lora.r": 16, "adapt.lora.alpha": 32,
                             "train.learning_rate": 1e-3})]
        for _, values in out[2:]:                   # not frozen: whatever the plain recipe froze is released
            values.update({"adapt.freeze_backbone": False, "adapt.freeze_layers": 0,
                           "adapt.freeze_embeddings": False})
        if self.adapt.method == "lora":             # a task whose default is LoRA: keep its method family
            out = [c for c in out if c[1]["adapt.method"] != "full"]
        return [c for c in out if lora or c[1]["adapt.method"] != "lora"]

    def dump(self) -> dict:
        return self.model_dump(mode="json")


# --- loading, overrides ------------------------------------------------------------------------------

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
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise RecipeError("command line", [f"override '{override}': the value is not valid YAML "
                                           f"({getattr(e, 'problem', e)}); quote it"]) from None


def read(path: str | Path) -> dict:
    """A recipe file's mapping; RecipeError with line and column for YAML mistakes."""
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
    return data


def migrate(data: dict, schema: int, cls: type[Recipe]) -> dict:
    """A resolved recipe written by an older run folder, in today's layout. Schema 1 dumped every task's keys
    with their defaults into every run: keep only those this task's recipe has."""
    if schema >= SCHEMA:
        return data

    def prune(node: dict, model: type[BaseModel]) -> dict:
        out = {}
        for key, value in node.items():
            field = model.model_fields.get(key)
            if field is None:
                continue
            sub = section_type(field.annotation)
            out[key] = prune(value, sub) if sub and isinstance(value, dict) else value
        return out

    return prune(data, cls)


def load(path: str | Path | dict, overrides: list[str] | tuple[str, ...] = (), schema: int = SCHEMA) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem. A dict is copied, never
    changed. schema: the layout version of a run folder's recipe.yaml (older ones are migrated)."""
    from tunesmith.tasks import recipe_classes

    if isinstance(path, dict):
        source, data = "recipe", copy.deepcopy(path)
    else:
        source, data = str(path), read(path)
    for o in overrides:
        apply_override(data, o)
    classes = recipe_classes()
    task, errors = data.get("task"), []
    if task not in classes:
        close = difflib.get_close_matches(task, list(classes), n=1) if isinstance(task, str) else []
        hint = f"did you mean '{close[0]}'? " if close else ""
        errors.append("task: required key is missing" if task is None else
                      f"task: unknown task {short(task)}: {hint}choose one of {', '.join(classes)}")
        if not close:
            raise RecipeError(source, errors)
        task = close[0]                         # report the other sections' mistakes as that task sees them
        data = {**data, "task": task}
    cls = classes[task]
    if schema < SCHEMA:
        data = migrate(data, schema, cls)
    try:
        recipe = cls.model_validate(data)
    except ValidationError as e:
        others = {name: c for name, c in classes.items() if name != task}
        raise RecipeError(source, errors + messages(e, cls, others)) from None
    if errors:
        raise RecipeError(source, errors)
    return recipe
