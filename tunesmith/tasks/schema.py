"""Each built-in task's recipe: its own keys, metrics (with the direction that is better) and defaults.

No torch here: the recipe is validated, every error at once, before anything heavy is imported. A task's keys
keep the section a user expects (`data.text_column`, `train.packing`, `eval.generate`), but only that task's
recipe has them: `augment.hflip` in a text-classification recipe is an error naming image-classification.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from tunesmith.recipe import DataConfig, EvalConfig, Recipe, Section, TrainConfig

CLASSIFICATION_METRICS: dict[str, Literal["max", "min"]] = {
    "accuracy": "max", "f1_macro": "max", "f1_weighted": "max", "precision_macro": "max", "recall_macro": "max",
    "loss": "min", "ece": "min"}


# --- classification (shared) ------------------------------------------------------------------------

class ClassificationData(DataConfig):
    label_column: str = "label"
    labels: list[str | int] | None = None       # label order; None: sorted labels seen in train


class ClassificationEval(EvalConfig):
    slices: list[str] = []                      # test-data columns to score per value (speaker, gender, source)
    min_slice_size: int = Field(30, gt=0)       # rows; smaller slices are "too small to judge", not a number
    positive_label: str | int | None = None     # fairness gaps' positive class; None: the second label of two,
                                                # with more labels the largest gap over classes (one-vs-rest)


class ClassificationTrain(TrainConfig):
    # epochs: auto does not stop before 100 optimizer steps: 3 epochs of a few hundred rows are ~40 steps; on
    # three small data sets (text and images, 3-fold cv) 100 steps lifted mean test accuracy by 6-20 points, on
    # every fold, and 300 added nothing beyond fold noise (docs/benchmarks.md, "the small-data default"). A number
    # of epochs is trained as given.
    min_steps: int = Field(100, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weights: Literal["balanced"] | list[float] | dict[str, float] | None = None


class ClassificationRecipe(Recipe):
    """What classification recipes share; a task's recipe adds `task` and its data section."""
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = CLASSIFICATION_METRICS
    default_metric: ClassVar[str] = "accuracy"

    train: ClassificationTrain = ClassificationTrain()
    eval: ClassificationEval = ClassificationEval()


# --- text classification ----------------------------------------------------------------------------

class TextClassificationData(ClassificationData):
    text_column: str = "text"
    max_length: int = Field(128, gt=0)          # tokens; longer inputs are truncated and counted


class TextClassificationRecipe(ClassificationRecipe):
    task_class: ClassVar[str] = "tunesmith.tasks.text_classification:TextClassification"

    task: Literal["text-classification"]
    data: TextClassificationData


# --- image classification ---------------------------------------------------------------------------

class ImageClassificationData(ClassificationData):
    image_column: str = "image"
    image_size: int | None = Field(None, gt=0)  # pixels, square model input; None: the model's image processor


class AugmentConfig(Section):
    """Training-time image augmentation, drawn per image from the run's seeded RNG."""
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


class ImageClassificationRecipe(ClassificationRecipe):
    task_class: ClassVar[str] = "tunesmith.tasks.image_classification:ImageClassification"

    task: Literal["image-classification"]
    data: ImageClassificationData
    augment: AugmentConfig = AugmentConfig()


# --- generation (shared by generative tasks: causal-lm now, seq2seq next) ----------------------------

class GenerateConfig(Section):
    """model.generate settings for evaluation, predict, chat and serve."""
    max_new_tokens: int = Field(32, gt=0)
    min_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool = False                     # False: greedy (or beam search with num_beams > 1)
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    num_beams: int = Field(1, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    no_repeat_ngram_size: int | None = Field(None, gt=0)
    length_penalty: float | None = None         # beam search: > 1 favours longer outputs
    seed: int = 0                               # sampling is seeded per call: the same input gives the same output

    def kwargs(self) -> dict:
        """The settings model.generate takes (unset ones left to the model's generation config)."""
        return {k: v for k, v in self.model_dump(exclude={"seed"}).items() if v is not None}


class GenerativeEval(EvalConfig):
    generate: GenerateConfig | None = None      # set: final evaluation also generates (exact match, ROUGE-L)


# --- causal LM (chat / instruction tuning) -----------------------------------------------------------

class CausalLMData(DataConfig):
    messages_column: str = "messages"           # list of {role, content}
    prompt_column: str = "prompt"
    response_column: str = "response"
    chat_template: str | None = None            # Jinja chat template; None: the tokenizer's own
    max_length: int = Field(128, gt=0)          # tokens per conversation; longer ones are cut and counted


class CausalLMTrain(TrainConfig):
    packing: bool = False                       # several examples per row, none attends across
    pack_length: int | None = Field(None, gt=0)  # tokens per packed row; None: data.max_length


class CausalLMRecipe(Recipe):
    task_class: ClassVar[str] = "tunesmith.tasks.causal_lm:CausalLM"
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = {"loss": "min", "perplexity": "min"}
    default_metric: ClassVar[str] = "loss"
    default_method: ClassVar[str] = "lora"
    # full: 2e-5, TRL's SFTConfig default and the Alpaca / Zephyr SFT recipes; LoRA: 2e-4 (QLoRA, TRL/PEFT examples)
    learning_rates: ClassVar[dict[str, float]] = {"full": 2e-5, "lora": 2e-4, "head": 1e-4}

    task: Literal["causal-lm"]
    data: CausalLMData
    train: CausalLMTrain = CausalLMTrain()
    eval: GenerativeEval = GenerativeEval()
