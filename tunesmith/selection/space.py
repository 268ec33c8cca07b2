"""The recipe's `search:` section and the default search space per task and method (torch-free).

A space maps a recipe key (dotted, as an override: `train.learning_rate`) to a range or a list of choices.
The default space is built from candidate keys kept only where the recipe's own schema has them (label
smoothing for classification recipes, LoRA's r/alpha for method lora), so no task name is asked.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Value = bool | int | float | str | None


class Param(BaseModel):
    """One searched key: `low`/`high` (ints give an integer range; `log` for a log scale) or `choices`."""
    model_config = ConfigDict(extra="forbid")
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    choices: list[Value] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high, or choices")
        if self.choices is None and not self.low <= self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.choices is None and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


BUDGET = re.compile(r"^(\d+(?:\.\d+)?)\s*([smh])$")


def seconds(budget: str) -> float:
    """'90s', '15m', '1.5h' -> seconds."""
    m = BUDGET.match(budget.strip())
    if not m:
        raise ValueError(f"a budget looks like 90s, 15m or 1.5h (got {budget[:40]!r})")
    out = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    if out <= 0:
        raise ValueError(f"a budget is a positive wall time, e.g. 90s, 15m or 1.5h (got {budget!r})")
    return out


class SearchConfig(BaseModel):
    """`tunesmith search` (Optuna TPE + pruning) and `tunesmith tune`; the command line may override any key."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    trials: int | None = Field(20, gt=0)        # completed or pruned trials to reach; None: until the budget
    budget: str | None = None                   # wall time, e.g. "20m"; no trial starts after it
    space: dict[str, Param] | None = None       # None: the default space for the task and adapt.method
    pruner: Literal["hyperband", "halving", "none"] = "hyperband"  # on the validation metric at each evaluation
    cv: int | None = Field(None, ge=2)          # score trials by K-fold cross-validation (small data; no pruning)
    seed: int = 0                               # TPE sampler seed
    heartbeat: int = Field(30, gt=0)            # seconds; a trial silent for 2x this is failed and retried
    max_retry: int = Field(2, ge=0)             # retries of a trial whose worker died

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        if v is not None:
            seconds(v)
        return v


def has_key(recipe_cls: type[BaseModel], key: str) -> bool:
    """Whether the dotted `key` names a field of the recipe class (through its section classes)."""
    model = recipe_cls
    for part in key.split("."):
        field = model.model_fields.get(part) if model else None
        if field is None:
            return False
        ann = field.annotation
        model = next((t for t in (ann, *getattr(ann, "__args__", ())) if isinstance(t, type)
                      and issubclass(t, BaseModel)), None)
    return True


def default_space(recipe) -> dict[str, Param]:
    """What `search` tries when the recipe names no space: ranges that suit the adaptation method."""
    method = recipe.adapt.method
    lr = {"full": (1e-5, 2e-4), "freeze": (1e-4, 1e-2), "lora": (5e-5, 5e-3)}.get(method, (1e-5, 1e-3))
    space = {
        "train.learning_rate": Param(low=lr[0], high=lr[1], log=True),
        "train.epochs": Param(low=2, high=8),
        "train.warmup": Param(low=0.0, high=0.2),
        "train.scheduler": Param(choices=["linear", "cosine", "constant"]),
        "train.weight_decay": Param(low=0.0, high=0.1),
        "train.batch_size": Param(choices=[8, 16, 32]),
        "model.dropout": Param(low=0.0, high=0.3),
        "train.label_smoothing": Param(low=0.0, high=0.2),
    }
    if method == "full":
        space["adapt.freeze_layers"] = Param(low=0, high=4)
    if method == "lora":
        space["adapt.lora.r"] = Param(choices=[4, 8, 16, 32])
        space["adapt.lora.alpha"] = Param(choices=[8, 16, 32, 64])
    return {k: p for k, p in space.items() if has_key(type(recipe), k)}
