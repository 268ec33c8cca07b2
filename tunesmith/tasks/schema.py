"""Each built-in task's recipe: its own keys, metrics (with the direction that is better) and defaults.

No torch here: the recipe is validated, every error at once, before anything heavy is imported. A task's keys
keep the section a user expects (`data.text_column`, `train.packing`, `eval.generate`), but only that task's
recipe has them: `augment.hflip` in a text-classification recipe is an error naming image-classification.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from tunesmith.recipe import AdaptConfig, DataConfig, DoctorConfig, EvalConfig, Guess, Recipe, Section, TrainConfig

CLASSIFICATION_METRICS: dict[str, Literal["max", "min"]] = {
    "accuracy": "max", "f1_macro": "max", "f1_weighted": "max", "precision_macro": "max", "recall_macro": "max",
    "loss": "min", "ece": "min"}


# --- classification (shared) ------------------------------------------------------------------------

class ClassificationData(DataConfig):
    label_column: str = "label"
    labels: list[str | int] | None = None       # label order; None: sorted labels seen in train
    # few-shot: K labelled train rows per class, drawn with train.seed after validation and test are split off (they
    # stay as they are); a class with fewer keeps all its rows (a warning names it). Same K and seed: same rows,
    # and a smaller K's rows are a subset of a larger K's (tunesmith/splits.py: shots)
    shots: int | None = Field(None, gt=0)


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


# --- recognising data (`tunesmith init`: Recipe.sniff; the profile is tunesmith/starter.py's) ------------

TOKENS_PER_WORD = 1.4           # sub-word tokens per whitespace word, a rough mean for English and BERT/Llama
PROMPTS = ("prompt", "instruction", "question", "query", "input")     # column names of a prompt ...
RESPONSES = ("response", "output", "answer", "completion")             # ... and of its response


def column(profile, key: str, shapes: tuple[str, ...], what: str, option: str, names=None):
    """(the column for data.`key`, None) or (None, why the user must choose): the user's (profile.hints), else the
    only column of one of `shapes` (and, given `names`, with one of those names)."""
    chosen = profile.hints.get(key)
    if chosen is not None:
        if chosen not in profile.columns:
            return None, f"no column '{chosen}' for data.{key} (the columns: {', '.join(profile.columns)})"
        return chosen, None
    found = [c for c in profile.columns if profile.shape(c) in shapes and (names is None or c.lower() in names)]
    if len(found) == 1:
        return found[0], None
    listed = "".join(f"\n  {profile.describe(c)}" for c in (found or profile.columns))
    head = f"{len(found)} {what} columns" if found else f"no {what} column"
    return None, f"{head}: choose one with {option}{listed}"


def tokens_needed(words: list[int], default: int, cap: int) -> int | None:
    """A max_length (tokens, a multiple of 32) holding 95% of the rows whole, when `default` does not; else None."""
    xs = sorted(words)
    need = xs[round(0.95 * (len(xs) - 1))] * TOKENS_PER_WORD if xs else 0
    return min(cap, math.ceil(need / 32) * 32) if need > default else None


# --- text classification ----------------------------------------------------------------------------

class TextClassificationData(ClassificationData):
    text_column: str = "text"
    max_length: int = Field(128, gt=0)          # tokens; longer inputs are truncated and counted


class ContrastiveConfig(Section):
    """adapt.method contrastive (SetFit, Tunstall et al. 2022; tunesmith/tasks/contrastive.py): the encoder learns
    from pairs of train rows, then a logistic regression head is fitted on its embeddings."""
    pairs: int = Field(20, gt=0)                # per train row: this many positive and as many negative pairs
                                                # (SetFit's num_iterations, default 20)
    head_c: float = Field(1.0, gt=0)            # the head's inverse L2 strength (scikit-learn's C; SetFit's default)


class TextClassificationAdapt(AdaptConfig):
    method: Literal["full", "freeze", "lora", "contrastive"] | None = None
    contrastive: ContrastiveConfig = ContrastiveConfig()


class TextClassificationRecipe(ClassificationRecipe):
    task_class: ClassVar[str] = "tunesmith.tasks.text_classification:TextClassification"
    starter_model: ClassVar[tuple[str, str]] = ("minilm", "sentence-transformers/all-MiniLM-L6-v2")
    # contrastive: SetFit's body_learning_rate default (2e-5)
    learning_rates: ClassVar[dict[str, float]] = {**Recipe.learning_rates, "contrastive": 2e-5}

    task: Literal["text-classification"]
    data: TextClassificationData
    adapt: TextClassificationAdapt = TextClassificationAdapt()

    @model_validator(mode="after")
    def _contrastive_epochs(self):
        """adapt.method contrastive has no validation curve to follow (the head is fitted after the encoder
        trains): epochs: auto means one epoch over the pairs, SetFit's default."""
        if self.adapt.method == "contrastive" and self.train.epochs == "auto":
            self.train.epochs = 1
        return self

    @classmethod
    def sniff(cls, profile) -> Guess | None:
        """A table with one text-like and one label-like column (or those data.text_column/label_column name)."""
        if profile.rows is None:
            return None
        text, why = column(profile, "text_column", ("text",), "text-like", "--text-column NAME")
        label, why_label = column(profile, "label_column", ("category",), "label-like", "--label-column NAME")
        if text is not None and text == label:
            text, why = None, f"'{text}' is given as both the text and the label column"
        if why or why_label:
            texts = any(profile.shape(c) == "text" for c in profile.columns)
            return Guess(0.5 if texts else 0.1, ambiguous="\n".join(w for w in (why, why_label) if w))
        texts = [v for v in profile.values(text) if isinstance(v, str)]
        labels = profile.values(label)
        counts = Counter(map(str, labels)).most_common()
        about = [f"{len(profile.rows):,} rows; text column '{text}': {profile.words(texts)}",
                 f"label column '{label}': {profile.classes(labels)}"]
        if len(labels) < len(profile.rows):
            about.append(f"rows without a label: {len(profile.rows) - len(labels):,}")
        about += [f"not used: {profile.describe(c)}" for c in profile.columns if c not in (text, label)]
        data = {"text_column": text, "label_column": label}
        default = TextClassificationData.model_fields["max_length"].default
        longer = tokens_needed([len(t.split()) for t in texts], default, 512)
        if longer:
            data["max_length"] = longer
            about.append(f"data.max_length {longer}: tokens holding 95% of the texts whole (default 128)")
        notes = []
        if len(counts) > 1 and counts[0][1] / counts[-1][1] > DoctorConfig().imbalance_ratio:
            notes.append(f"the classes are imbalanced ({counts[0][1] / counts[-1][1]:.1f}x): to weigh them, "
                         f"train: {{class_weights: balanced}}")
        return Guess(0.9, data, about, notes)


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
    starter_model: ClassVar[tuple[str, str]] = ("mobilenet_v2", "google/mobilenet_v2_1.0_224")

    task: Literal["image-classification"]
    data: ImageClassificationData
    augment: AugmentConfig = AugmentConfig()

    @classmethod
    def sniff(cls, profile) -> Guess | None:
        """An image folder: one subfolder of images per class, or train/ (val/, test/) subfolders holding them."""
        if profile.images is None:
            return None
        train = profile.images.get("train", profile.images.get(""))
        if len(train) < 2:
            return Guess(0.5, ambiguous=f"{len(train)} class folder(s) ({', '.join(train)}): an image folder holds "
                                        f"one subfolder of images per class, at least two")
        about, files = [], []
        for split, classes in profile.images.items():
            labels = [c for c, fs in classes.items() for _ in fs]
            files += [f for fs in classes.values() for f in fs]
            about.append(f"{split or 'images'}: {len(labels):,} images, {profile.classes(labels)}")
            unknown = sorted(set(classes) - set(train))
            if unknown:
                about.append(f"{split}: classes not in train (their images are rejected): {', '.join(unknown)}")
        about.append(profile.image_sizes(files))
        notes = ["small data trains better with augmentation, e.g. augment: {hflip: 0.5, crop_scale: [0.6, 1.0]}"]
        return Guess(0.95, dict(profile.folders), about, notes)


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


class GenerativeTuning:
    """What `tune` scores and races for a generative task's recipe (mixed in before Recipe)."""

    def tune_metric(self) -> tuple[str, Literal["max", "min"]]:
        """With eval.generate: exact match of the generated answers on the validation rows (what a chat model is
        judged by: the loss can fall while the answers stay wrong); else validation loss."""
        return ("exact_match", "max") if self.eval.generate is not None else super().tune_metric()

    def search_space(self, blocks: int | None, learning_rate: float, lora: bool = True) -> list[tuple[str, dict]]:
        """LoRA candidates, strongest first (tune races them in this order while its budget lasts, rather than
        many at runs too short to tell them apart): the plain recipe's rank and alpha at its learning rate x3 and
        /3 (the rate matters most for a small adapter; QLoRA's 2e-4 and PEFT's examples sit in 1e-4 .. 1e-3),
        then 4x the rank (alpha scaled with it: the update's scale kept) at the rate and x3. A plain recipe that
        is not LoRA starts from LoRA's own rate and rank (a full fine-tuning rate leaves an adapter untrained).
        None where LoRA has no modules to wrap in the model."""
        if not lora:
            return []
        own = self.adapt.method == "lora"
        cfg = self.adapt.lora if own else type(self.adapt.lora)()      # the recipe's LoRA, else the defaults
        r, alpha = cfg.r, cfg.alpha
        lr = learning_rate if own else type(self).learning_rates["lora"]
        out = []
        for rank, rate in ((r, 3 * lr), (r, lr / 3), (4 * r, lr), (4 * r, 3 * lr)):
            rate = float(f"{rate:.3g}")
            out.append((f"lora r{rank} lr {rate:g}", {"adapt.method": "lora", "adapt.lora.r": rank,
                                                      "adapt.lora.alpha": alpha * rank / r,
                                                      "train.learning_rate": rate}))
        return out


# --- causal LM (chat / instruction tuning) -----------------------------------------------------------

class CausalLMData(DataConfig):
    messages_column: str = "messages"           # list of {role, content}
    prompt_column: str = "prompt"
    response_column: str = "response"
    chat_template: str | None = None            # Jinja chat template; None: the tokenizer's own
    max_length: int = Field(128, gt=0)          # tokens per conversation; longer ones are cut and counted
    chosen_column: str = "chosen"               # train.objective dpo/orpo: the preferred answer (text or messages)
    rejected_column: str = "rejected"           # ... and the dispreferred one


class DPOConfig(Section):
    """train.objective: dpo (Rafailov et al. 2023), the reference being the model before training."""
    beta: float = Field(0.1, gt=0)              # strength of the pull from the reference (TRL's default 0.1)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO's; ipo: squared, on per-token mean log-probs


class ORPOConfig(Section):
    """train.objective: orpo (Hong et al. 2024): SFT loss on the chosen answer + lambda x odds-ratio loss."""
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)   # recipe.yaml says `lambda`
    lambda_: float = Field(0.1, gt=0, alias="lambda")   # weight of the odds-ratio term (the paper's and TRL's 0.1)


class CausalLMTrain(TrainConfig):
    packing: bool = False                       # several examples per row, none attends across
    pack_length: int | None = Field(None, gt=0)  # tokens per packed row; None: data.max_length
    # sft: the assistant turns' cross-entropy; dpo / orpo: preference pairs (prompt + chosen + rejected rows,
    # tunesmith/tasks/preference.py)
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()

    @model_validator(mode="after")
    def _no_packing_pairs(self):
        if self.packing and self.objective != "sft":
            raise ValueError(f"train.packing works with train.objective sft only, not {self.objective}: "
                             "preference pairs are batched chosen + rejected")
        return self


PREFERENCE_METRICS: dict[str, Literal["max", "min"]] = {
    "loss": "min", "reward_accuracy": "max", "reward_margin": "max", "logp_accuracy": "max",
    "chosen_logp": "max", "rejected_logp": "min"}
GENERATION_METRICS: dict[str, Literal["max", "min"]] = {"exact_match": "max", "rouge_l": "max"}


def conversation(value) -> list[dict] | None:
    """A messages value ([{role, content}], or its JSON text) as a list, or None when it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    return value if ok else None


class CausalLMRecipe(GenerativeTuning, Recipe):
    task_class: ClassVar[str] = "tunesmith.tasks.causal_lm:CausalLM"
    # every objective's metrics (train.metric is checked against its objective's: objective_metrics)
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = {"loss": "min", "perplexity": "min",
                                                           **PREFERENCE_METRICS, **GENERATION_METRICS}
    default_metric: ClassVar[str] = "loss"
    default_method: ClassVar[str] = "lora"
    starter_model: ClassVar[tuple[str, str]] = ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")
    # full: 2e-5, TRL's SFTConfig default and the Alpaca / Zephyr SFT recipes; LoRA: 2e-4 (QLoRA, TRL/PEFT examples)
    learning_rates: ClassVar[dict[str, float]] = {"full": 2e-5, "lora": 2e-4, "head": 1e-4}

    task: Literal["causal-lm"]
    data: CausalLMData
    train: CausalLMTrain = CausalLMTrain()
    eval: GenerativeEval = GenerativeEval()

    def default_train_metric(self) -> str:
        """epochs: auto with eval.generate stops on exact match of the generated answers (what a chat model is
        judged by: the loss can fall while the answers stay wrong, issue 19); a number of epochs keeps the loss."""
        if self.eval.generate is not None and self.train.epochs == "auto" and not self.train.max_steps:
            return "exact_match"
        return self.default_metric

    @model_validator(mode="after")
    def _generated_metric(self):
        if self.train.metric in ("exact_match", "rouge_l") and self.eval.generate is None:
            raise ValueError(f"train.metric {self.train.metric} scores generated answers: set eval.generate "
                             f"(e.g. {{max_new_tokens: 32}}) or choose loss")
        return self

    @model_validator(mode="before")
    @classmethod
    def _preference_metric(cls, data):
        """dpo / orpo without train.metric: the best checkpoint by held-out reward accuracy, or by exact match of
        the generated answers when eval.generate is set."""
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict) and train.get("objective", "sft") != "sft" and train.get("metric") is None:
            generate = (data.get("eval") or {}).get("generate") if isinstance(data.get("eval"), dict) else None
            data = {**data, "train": {**train, "metric": "exact_match" if generate else "reward_accuracy"}}
        return data

    @model_validator(mode="after")
    def _objective_metric(self):
        known = self.objective_metrics()
        if self.train.metric not in known:
            raise ValueError(f"train.metric '{self.train.metric}' is not reported under train.objective="
                             f"{self.train.objective}: choose one of {', '.join(known)}")
        return self

    def objective_metrics(self) -> dict[str, Literal["max", "min"]]:
        """What validation reports under train.objective: sft loss and perplexity; dpo / orpo the pair metrics,
        with exact match and ROUGE-L of generated (chosen) answers when eval.generate is set (both objectives)."""
        generated = GENERATION_METRICS if self.eval.generate is not None else {}
        if self.train.objective == "sft":
            return {"loss": "min", "perplexity": "min", **generated}
        return {**PREFERENCE_METRICS, **generated}

    def task_for(self):
        return "tunesmith.tasks.preference:Preference" if self.train.objective != "sft" else self.task_class

    @classmethod
    def sniff(cls, profile) -> Guess | None:
        """A table with a messages column (lists of {role, content}, or their JSON), or a prompt and a response
        column (named like PROMPTS, RESPONSES, or as data.prompt_column/response_column say)."""
        if profile.rows is None:
            return None
        hint = profile.hints.get("messages_column")
        for c in [hint] if hint else profile.columns:
            values = profile.values(c)
            chats = [x for x in map(conversation, values) if x]
            if values and len(chats) >= 0.9 * len(values):
                return cls._chats(profile, chats, {"messages_column": c}, 0.95)
        given = {"prompt_column", "response_column"} & set(profile.hints)
        shapes = ("text", "category", "number", "other")          # names decide; values must be strings
        prompt, why = column(profile, "prompt_column", shapes, "prompt-like", "data.prompt_column=NAME", PROMPTS)
        response, why_r = column(profile, "response_column", shapes, "response-like", "data.response_column=NAME",
                                 RESPONSES)
        if why or why_r:
            named = given or any(c.lower() in PROMPTS + RESPONSES for c in profile.columns)
            return Guess(0.6, ambiguous="\n".join(w for w in (why, why_r) if w)) if named else None
        chats = [[{"role": "user", "content": r[prompt]}, {"role": "assistant", "content": r[response]}]
                 for r in profile.rows if isinstance(r.get(prompt), str) and isinstance(r.get(response), str)]
        guess = cls._chats(profile, chats, {"prompt_column": prompt, "response_column": response}, 0.85)
        if len(chats) < len(profile.rows):
            guess.about.append(f"rows without a text prompt and response: {len(profile.rows) - len(chats):,}")
        return guess

    @classmethod
    def _chats(cls, profile, chats: list[list[dict]], data: dict, score: float) -> Guess:
        roles = Counter(m["role"] for chat in chats for m in chat)
        answers = [m["content"] for chat in chats for m in chat if m["role"] == "assistant"]
        ending = sum(chat[-1]["role"] == "assistant" for chat in chats)
        about = [f"{len(chats):,} conversations; {profile.spread((len(c) for c in chats), 'turns')}",
                 "roles: " + ", ".join(f"{r} {n:,}" for r, n in roles.most_common()),
                 f"assistant turns: {profile.words(answers)}",
                 f"conversations ending with an assistant turn: {ending:,} of {len(chats):,}"]
        about += [f"not used: {profile.describe(c)}" for c in profile.columns if c not in data.values()]
        data = dict(data)
        longer = tokens_needed([sum(len(m["content"].split()) + 6 for m in c) for c in chats],
                               CausalLMData.model_fields["max_length"].default, 2048)
        if longer:
            data["max_length"] = longer
            about.append(f"data.max_length {longer}: tokens holding 95% of the conversations whole (default 128)")
        new = max(16, math.ceil(max((len(a.split()) for a in answers), default=1) * TOKENS_PER_WORD / 16) * 16)
        notes = ["to also score generated answers (exact match, ROUGE-L) on the test split:",
                 f"eval: {{generate: {{max_new_tokens: {new}}}}}"]
        return Guess(score, data, about, notes)
