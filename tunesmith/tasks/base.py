"""The Task protocol: what a task supplies so that shared code (loop, commands) never asks its name.

Setup:  setup(source) loads the processor (no weights);  labels;  metrics (name -> "max"/"min")
Data:   read(source, split) -> Table or None (a format of its own);
        check(row, split) -> reason or None; check_notes();  prepare(train_rows);  encode(rows) -> Features;
        length(feature);  collate(features) -> batch
Model:  load_model() -> model for training;  load_trained(folder) -> model;  save(model, folder)
Train:  precompute(model, features, batch_size) once before training;  loss(model, batch) -> sum over items;
        count(batch) -> items;  evaluate(model, features, batch_size);
        objective(features) -> what fit minimises under adapt.method (the task itself, or e.g. contrastive pairs)
        evaluate_final(...) for eval.json (adds slow metrics and per-example files)
Distil: teacher_outputs(model, features, batch_size);  distillation(temperature, alpha) -> objective, where
        `distills` (tunesmith distill)
Use:    check_input(input) -> reason or None;  predict(model, inputs) -> one dict per input, in the task's
        output schema (shared by `predict`, the Python API and `serve`)
Doctor: key(row); stratify_key(row); balance_labels(row); length_stats(rows, features);
        embed(model, features, batch_size)

Capabilities are declared here, on the class, and shared code reads the declarations; it never compares a task's
name and never probes for a method (tests/test_layering.py checks the first):
  prediction        the kind of one prediction: "label", "spans", "text" or "boxes" (tunesmith/tasks/outputs.py);
                    output_schema() is its pydantic schema. /v1/predict documents it, the serve page and the report
                    draw predictions by it
  chats             True: prompt_ids(messages), generation_settings() and complete() work, so `tunesmith chat` and
                    POST /v1/chat/completions are offered. A task whose answer depends on the model declares it as a
                    property of the instance, read once the model is loaded (text2text: a decoder-only chat model).
                    Generation itself is one implementation for every caller (tunesmith/tasks/generation.py:
                    decoder-only and encoder-decoder models)
  generative        True: the model writes text (generate, complete; stream() hands one prediction's text on as it
                    is written: /v1/predict with stream, tunesmith predict --stream)
  explainable       True: explain() works (tunesmith explain, the report's explanations)
  export_outputs()  the ONNX graph's outputs {name: dynamic axes}, or None: the task is not exportable to ONNX
                    (tunesmith export then offers --format hf); export_inputs() gives the graph's inputs;
  export_generation()  optimum-onnx's export task for a generating model (encoder-decoder), or None
  distills          True: teacher_outputs() and distillation() work (tunesmith distill)
  feature_cache     True: collate takes cached hidden states (tunesmith/featcache.py)
  balance_unit      what the doctor's class balance counts, one per balance_labels() item: "rows" (a row's label,
                    its stratify_key) or a part of a row ("entities": a tagger counts each entity's type)
  row_unit          what one row is in counts ("rows"; detection "images")
  part_unit         None: the reader's rejects (Table.rejects) are whole rows. A name ("boxes"): they are parts of
                    rows (a label file's bad box; its image stays), counted apart from rows in data/splits.json and
                    the doctor's files table; parts(row) counts a usable row's parts
"""
from __future__ import annotations

import unicodedata

import torch

from tunesmith.tasks.batching import batch_logits, batches, embeddings, model_device  # noqa: F401   (re-exported)
from tunesmith.tasks.outputs import SCHEMAS, Prediction


class Features(list):
    """What `Task.encode` returns: the features (a list), and how many examples were cut at the length limit;
    rows: the rows they were encoded from, for a task whose evaluate needs them (generated answers), else None."""

    def __init__(self, items=(), truncated: int = 0, rows: list | None = None):
        super().__init__(items)
        self.truncated = truncated
        self.rows = rows


def blank(text: str) -> bool:
    """True when text holds nothing once whitespace and control characters (Unicode category C) are removed."""
    return not any(unicodedata.category(c)[0] != "C" for c in text if not c.isspace())


class Task:
    """Lifecycle, the same for every caller (train, doctor, eval, predict, chat, serve):
      1. task = TaskClass(recipe)          nothing loaded, nothing read; TaskClass(recipe, pad_multiple) for
                                           training (set once here: shared code never assigns task attributes)
      2. task.setup(source=None)           processor (tokenizer, image processor) from a model folder, hub id or a
                                           run's model/; no weights. Default: the recipe's model. Done on first use
                                           of `task.processor` if not called.
      3. task.check(row, split)            per row; then task.prepare(train_rows) learns the label set (training);
                                           load_trained(folder) restores it from the saved model instead
      4. task.encode(rows) -> Features;    task.collate(features) -> batch (nested dicts/lists of tensors allowed)
      5. task.load_model() -> model        pretrained weights + a new head (training); or load_trained(folder)
      6. loss, count, evaluate, evaluate_final, predict, generate: read-only on the task (no state kept between
         calls), so one task and model can serve several threads (callers serialise the model's own use).
    Every capability a caller may use is declared here (the module docstring lists them); a task says what it
    lacks by its declarations (`chats` False, export_outputs() None) and `labels` (None), never by a missing
    attribute.
    """
    name = ""
    peft_task_type: str | None = None
    input_key = "text"              # what a bare command-line input becomes: {input_key: value}
    near_method = "text"            # doctor.near_method auto: "text" (Task.key strings) or "embedding" (Task.embed)
    prediction = "label"            # the kind of one prediction: "label", "spans", "text", "boxes" (tasks/outputs.py)
    chats = False                   # True: `tunesmith chat` and /v1/chat/completions (prompt_ids, complete) work
    generative = False              # True: the model writes text through tasks/generation.py (generate, complete)
    feature_cache = False           # True: collate takes features carrying `hidden` ([T, H], the cached input of
                                    # block k, tunesmith/featcache.py) and passes it as the model's inputs_embeds
    explainable = False             # True: explain() works (tunesmith explain, the report's explanations)
    distills = False                # True: teacher_outputs() and distillation() work (tunesmith distill trains a
                                    # smaller student on this task's fine-tuned model)
    balance_unit = "rows"           # what balance_labels() counts: "rows" (one label a row), or e.g. "entities"
    row_unit = "rows"               # what one row is, in counts ("images")
    part_unit: str | None = None    # the reader rejects parts of rows ("boxes"), not rows: see the module docstring

    def __init__(self, recipe, pad_multiple: int = 1):
        self.recipe = recipe
        # collate rounds batch widths up to a multiple of this: training passes train.pad_multiple (16 on GPUs,
        # where each new width costs kernel selection; 1 on CPUs); predict and eval keep 1
        self.pad_multiple = pad_multiple
        self._processor = None

    @property
    def metrics(self) -> dict[str, str]:
        """Metric name -> "max" or "min": what evaluate() reports and which way is better."""
        return type(self.recipe).metrics

    @property
    def path_columns(self) -> tuple[str, ...]:
        """Columns holding file paths: read relative to their data file, stored relative to the run folder."""
        return ()

    @property
    def labels(self) -> list[str] | None:
        """Label names in id order (classification), or None for a task without a label set."""
        return None

    @property
    def max_length(self) -> int | None:
        """Tokens an example is cut at (data.max_length), or None for a task without tokens."""
        return None

    @property
    def class_weights(self):
        """train.class_weights as the recipe gives it, or None (also for tasks without classes)."""
        return None

    @property
    def shots(self) -> int | None:
        """data.shots: train rows kept per class (stratify_key) for few-shot training, or None (all rows; also for
        tasks without classes)."""
        return None

    # --- processor ----------------------------------------------------------------------------------
    def setup(self, source: str | None = None) -> None:
        """Load the processor from `source` (default: the recipe's model); no weights."""
        from tunesmith.assets.bundled import resolve_model
        from tunesmith.tasks.hf import load_error

        name = source or resolve_model(self.recipe.model.name)
        try:
            self._processor = self.load_processor(name, None if source else self.recipe.model.revision)
        except (OSError, ValueError) as e:
            raise load_error(source or self.recipe.model.name, e) from None

    @property
    def trust_remote_code(self) -> bool:
        """model.trust_remote_code: pass it to every from_pretrained (False: a model folder's own code never runs)."""
        return self.recipe.model.trust_remote_code

    def load_processor(self, source: str, revision: str | None):
        """The tokenizer or image processor stored at `source`."""
        raise NotImplementedError

    @property
    def processor(self):
        if self._processor is None:
            self.setup()
        return self._processor

    # --- data ---------------------------------------------------------------------------------------
    def read(self, source: str, split: str):
        """A data file in a format of this task's own (CoNLL for taggers) as a tunesmith.data.Table (rows, origins
        FILE:LINE, rejects), or None: the shared readers take it (CSV, JSONL, Parquet, images, HF datasets)."""
        return None

    def check(self, row: dict, split: str) -> str | None:
        """Why `row` cannot be used, or None. Called on train rows before `prepare`, then on the others."""
        return None

    def check_notes(self) -> list[str]:
        """What `check` changed or noticed in the rows it accepted, one line each, for the doctor's warnings (a
        tagger's tag sequences repaired under data.tag_repair); [] by default."""
        return []

    def stratify_key(self, row: dict):
        """Value to stratify held-out splits by (a label), or None."""
        return None

    def balance_labels(self, row: dict) -> list:
        """The classes `row` adds to the doctor's class-balance counts, one per `balance_unit`: by default its
        stratify_key alone ([] when it has none)."""
        label = self.stratify_key(row)
        return [] if label is None else [label]

    def key(self, row: dict) -> str:
        """The example's input as one string; duplicate and leakage checks compare these."""
        raise NotImplementedError

    def prepare(self, rows: list[dict]) -> None:
        """Learn what encoding needs from the usable training rows (for example the label set)."""

    def encode(self, rows: list[dict]) -> Features:
        raise NotImplementedError

    def length(self, feature: dict) -> int:
        return len(feature["input_ids"])

    def padded(self, width: int) -> int:
        """`width` rounded up to pad_multiple, never past max(width, data.max_length)."""
        rounded = -(-width // self.pad_multiple) * self.pad_multiple
        return min(rounded, max(width, self.max_length or width))

    def collate(self, features: list[dict]) -> dict:
        raise NotImplementedError

    # --- data doctor (tunesmith/diagnosis/diagnose.py); features = encode(rows) ------------------------------------
    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        """Tokens per row, for the doctor (features may be packed); each value is a list with one entry per row,
        or a list of row indices:
          kept:        tokens training sees (after cutting at data.max_length)
          lengths:     tokens before cutting (absent: what was cut is unknown)
          trained:     tokens whose label is not -100 (chat: the answer tokens)
          all_masked:  indices of examples whose every label is -100 (they train as loss 0: blocking)
          missing_end: indices of examples whose trained tokens lack the end-of-turn token
          windowed:    indices of examples longer than data.max_length that train and score as several
                       overlapping windows (nothing cut) rather than being cut
        Default: `kept` from `length` when features are one per row and hold input_ids; {} (not available) otherwise."""
        if features and len(features) == len(rows) and "input_ids" in features[0]:
            return {"kept": [self.length(f) for f in features]}
        return {}

    def data_findings(self, tables: dict) -> tuple[dict, list[str], list[str]]:
        """The doctor's checks of this task's own, on the usable rows (tables: split -> data.Table, rows and origins):
        (a JSON-ready section, doctor.json's "task" key; {}: none), warning lines, blocking lines. Default: none."""
        return {}, [], []

    def findings_lines(self, section: dict, listed: int) -> list[str]:
        """data_findings' section as terminal lines (doctor.json's task_lines, which `tunesmith doctor` prints under
        the task's title): what the warnings alone do not say. Default: none."""
        return []

    def parts(self, row: dict) -> int:
        """How many `part_unit` items a row holds (a detection row's boxes); 0 where the task has no part_unit."""
        return 0

    def embed(self, model, features: list[dict], batch_size: int):
        """[N, D] float32 numpy array, one vector per feature, for the label-noise model and near duplicates.
        Default: the last hidden state averaged over real positions (attention_mask) for [B, T, H] outputs,
        over the spatial axes for [B, C, H, W] feature maps."""
        return embeddings(self, model, features, batch_size)

    # --- model --------------------------------------------------------------------------------------
    def load_model(self):
        """The model to fine-tune (pretrained weights, a head for this task's labels); processor set up."""
        raise NotImplementedError

    def load_trained(self, folder):
        """A fine-tuned model saved by `save`; sets up the processor and labels from the same folder."""
        raise NotImplementedError

    def save(self, model, folder) -> None:
        model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    # --- training and evaluation --------------------------------------------------------------------
    def precompute(self, model, features: dict[str, list[dict]], batch_size: int) -> None:
        """Per-feature values computed once from the model as loaded (before eval.before, adaptation and the
        first step) and stored in the features of every split (split -> features): causal-lm's DPO reference
        log-probs. Default: nothing."""

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The SUM of the batch's per-item losses (items: examples, or label tokens); the loop divides by the
        items of the whole optimizer step (all micro-batches, all processes), so gradient accumulation and DDP
        weigh every item alike. Default: HF's own mean `.loss` times `count`."""
        return model(**batch).loss * self.count(batch)

    def count(self, batch: dict) -> float:
        """How many items `loss` sums over (from the batch alone, before any forward pass)."""
        return float(len(batch["labels"]))

    # the objective protocol beyond collate, loss, count (tunesmith/steps.py): fit validates with this task's
    # metrics while training; finish() runs after fit, before the model is saved
    validates = True

    def finish(self, model, batch_size: int, say) -> None:
        """What an objective does once fit ends, before the model is saved; nothing for the task's own loss."""

    def objective(self, features: dict):
        """What fit minimises under the recipe's adapt.method (collate, loss, count, validates, finish): the task
        itself by default. It may replace features["train"] (adapt.method contrastive: pairs of rows)."""
        return self

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        """Every metric in `self.metrics` (and any others) on encoded, labelled features."""
        raise NotImplementedError

    def evaluate_final(self, model, rows: list[dict], features: list[dict], batch_size: int,
                       out_dir=None) -> dict:
        """Metrics for eval.json and `tunesmith eval`: `evaluate` plus what is too slow to run at every
        validation (generation, per-example listings). out_dir: where to write per-example files
        (samples, misclassified examples), or None."""
        return self.evaluate(model, features, batch_size)

    # --- distillation (where `distills`; tunesmith/deploy/distill.py) ------------------------------------------
    def teacher_outputs(self, model, features: list[dict], batch_size: int) -> list:
        """What a student learns from this task's fine-tuned `model`: one JSON-ready value per feature, in order;
        distill stores each as the feature's `teacher`. Default: the model's logits (batch_logits)."""
        return batch_logits(model, self, features, batch_size)

    def distillation(self, temperature: float, alpha: float):
        """The objective a student minimises, as fit() takes it: collate(features) -> batch (train features carry
        `teacher`), loss(model, batch) -> the SUM over the batch's items of alpha x the soft loss against the
        teacher's outputs at `temperature` + (1 - alpha) x the loss on the true labels, count(batch) -> items."""
        raise NotImplementedError(f"task '{self.name}' cannot be distilled")

    def loggable(self, metrics: dict) -> dict:
        """The scalar part of `metrics`, for metrics.jsonl."""
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def summary(self, metrics: dict) -> str:
        """One line of the headline metrics, for the terminal."""
        keys = [k for k in self.metrics if k in metrics][:3]
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)

    def check_input(self, item) -> str | None:
        """Why one prediction input (a string, or a row with the recipe's columns) cannot be used, or None; callers
        answer such an input with {"error": reason} in its place. Default: a string empty once whitespace and control
        characters (Unicode category C: "\\u0000", format marks) are removed is refused."""
        if isinstance(item, str) and blank(item):
            return "empty input"
        return None

    @classmethod
    def output_schema(cls) -> type[Prediction]:
        """The pydantic schema of one prediction (what `predict` returns per input): by default the one of its
        kind, `prediction`; a task with more fields returns a subclass of it."""
        return SCHEMAS[cls.prediction]

    def predict(self, model, inputs: list) -> list[dict]:
        """One JSON-ready dict per input, in order, following `output_schema()` (shared by `predict`, the Python
        API and `serve`); every input passed `check_input`."""
        raise NotImplementedError

    def explain(self, model, inputs: list) -> list[dict]:
        """Why the model predicts what it does: one JSON-ready dict per input (as `predict` takes them), with
        the prediction ("predicted", "probability") and the attributions toward it: text {"tokens",
        "attributions"} (one per token), images {"saliency" (rows of [0, 1] values), "overlay" (PNG data URI)}.
        Needs captum (the `explain` extra)."""
        raise NotImplementedError(f"task '{self.name}' has no explanations")

    # --- ONNX export (tunesmith/deploy/export.py) ------------------------------------------------------
    def export_outputs(self) -> dict[str, dict[int, str]] | None:
        """The ONNX graph's outputs: each name (an attribute of what the model returns, `.logits`) and its dynamic
        axes ({0: "batch"}); None: this task is not exported to ONNX (the default)."""
        return None

    def export_generation(self) -> str | None:
        """For a generating model exported through optimum-onnx (tunesmith/deploy/export_generate.py): optimum's
        export task ("text2text-generation-with-past": encoder and decoder graphs, KV cache); None (the default):
        not exported that way. Read where export_outputs() is None."""
        return None

    def export_inputs(self) -> dict[str, tuple[torch.Tensor, dict[int, str]]]:
        """ONNX export: the model's inputs by name (what `collate` gives, without labels), each as a small example
        tensor and its dynamic axes ({0: "batch", 1: "sequence"}); needed where export_outputs() is not None."""
        raise NotImplementedError(f"task '{self.name}' cannot be exported to ONNX")

    # --- generation (see tunesmith/tasks/generation.py) -----------------------------------------------
    def generate(self, model, prompts: list, batch_size: int, settings=None) -> list[str]:
        """The generated text of each prompt (batched; evaluation and predict), where `generative`."""
        raise NotImplementedError(f"task '{self.name}' does not generate text")

    def stream(self, model, item, on_text, stop=None) -> dict:
        """`predict` for one input, its generated text passed to on_text(piece) as it is written, where
        `generative` (serve's /v1/predict with stream, tunesmith predict --stream)."""
        raise NotImplementedError(f"task '{self.name}' does not generate text")

    def generation_settings(self):
        """The recipe's generation settings (a GenerateConfig), where `generative`."""
        raise NotImplementedError(f"task '{self.name}' does not generate text")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation the model answers, where `chats`."""
        raise NotImplementedError(f"task '{self.name}' does not chat")

    def complete(self, model, prompts: list[list[int]], settings=None, stop=None, on_text=None) -> list:
        """Completions (text, new tokens, finish reason) of token-id prompts, streamed through on_text and ended
        early by the `stop` event, where `generative` (tunesmith/tasks/generation.py)."""
        raise NotImplementedError(f"task '{self.name}' does not generate text")
