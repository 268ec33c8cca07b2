"""The Task protocol: what a task supplies so that shared code (loop, commands) never asks its name.

Data:   check(row, split) -> reason or None;  prepare(train_rows);  encode(rows) -> features;
        length(feature);  collate(features) -> tensors
Model:  load_model() -> (model, processor) for training;  load_trained(folder);  save(model, processor, folder)
Train:  loss(model, batch) (default: the HF model's own `.loss`);  evaluate(model, features, batch_size)
        evaluate_final(...) for eval.json (adds slow metrics and per-example files)
Use:    predict(model, processor, inputs) -> JSON-ready dicts (shared by `predict` and `serve`)
Doctor: key(row); stratify_key(row); length_stats(rows, features); embed(model, features, batch_size)
"""
from __future__ import annotations

import torch


class Task:
    name = ""
    metric = "loss"                 # default selection metric (best checkpoint, early stopping)
    peft_task_type: str | None = None
    default_method = "full"         # adapt.method when the recipe leaves it unset
    input_key = "text"              # what a bare command-line input becomes: {input_key: value}
    near_method = "text"            # doctor.near_method auto: "text" (Task.key strings) or "embedding" (Task.embed)
    path_columns: tuple[str, ...] = ()  # columns holding file paths, read relative to their CSV/JSONL file

    def __init__(self, recipe):
        self.recipe = recipe

    # --- data ---------------------------------------------------------------------------------------
    def check(self, row: dict, split: str) -> str | None:
        """Why `row` cannot be used, or None. Called on train rows before `prepare`, then on the others."""
        return None

    def stratify_key(self, row: dict):
        """Value to stratify held-out splits by (a label), or None."""
        return None

    def key(self, row: dict) -> str:
        """The example's input as one string; duplicate and leakage checks compare these."""
        raise NotImplementedError

    def prepare(self, rows: list[dict]) -> None:
        """Learn what encoding needs from the usable training rows (for example the label set)."""

    def encode(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def length(self, feature: dict) -> int:
        return len(feature["input_ids"])

    pad_multiple = 1                # the loop sets it from train.pad_multiple: 16 on GPUs (each new width
                                    # costs kernel selection there), 1 on CPUs (widths cost nothing)

    def padded(self, width: int) -> int:
        """`width` rounded up to pad_multiple, never past max(width, data.max_length)."""
        rounded = -(-width // self.pad_multiple) * self.pad_multiple
        return min(rounded, max(width, self.recipe.data.max_length))

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- data doctor (tunesmith/doctor.py); features = encode(rows) ------------------------------------
    def length_stats(self, rows: list[dict], features: list[dict]) -> dict:
        """Tokens per row, for the doctor (features may be packed); each value is a list with one entry per row,
        or a list of row indices:
          kept:        tokens training sees (after cutting at data.max_length)
          lengths:     tokens before cutting (absent: what was cut is unknown)
          trained:     tokens whose label is not -100 (chat: the answer tokens)
          all_masked:  indices of examples whose every label is -100 (they train as loss 0: blocking)
          missing_end: indices of examples whose trained tokens lack the end-of-turn token
        Default: `kept` from `length` when features are one per row and hold input_ids; {} (not available) otherwise."""
        if features and len(features) == len(rows) and "input_ids" in features[0]:
            return {"kept": [self.length(f) for f in features]}
        return {}

    def embed(self, model, features: list[dict], batch_size: int):
        """[N, D] float32 numpy array, one vector per feature, for the label-noise model and near duplicates.
        Default: the last hidden state averaged over real positions (attention_mask) for [B, T, H] outputs,
        over the spatial axes for [B, C, H, W] feature maps."""
        import numpy as np
        from tqdm import tqdm

        out = [None] * len(features)
        steps = (len(features) + batch_size - 1) // batch_size
        for idx, batch in tqdm(batches(self, features, batch_size, model_device(model)), total=steps,
                               desc="embed", unit="batch", mininterval=1.0, leave=False):
            batch.pop("labels", None)
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
            if hidden.dim() == 3:                                   # [B, T, H]
                mask = batch.get("attention_mask")
                mask = torch.ones_like(hidden[..., 0]) if mask is None else mask.to(hidden.dtype)
                vectors = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            elif hidden.dim() == 4:                                 # [B, C, H, W]
                vectors = hidden.mean((2, 3))
            else:
                vectors = hidden.flatten(1)
            for i, v in zip(idx, vectors.cpu().numpy()):
                out[i] = v
        return np.stack(out).astype(np.float32)

    # --- model --------------------------------------------------------------------------------------
    def load_model(self):
        raise NotImplementedError

    def load_trained(self, folder):
        raise NotImplementedError

    def save(self, model, processor, folder) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    # --- training and evaluation --------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        raise NotImplementedError

    def evaluate_final(self, model, rows: list[dict], features: list[dict], batch_size: int,
                       out_dir=None) -> dict:
        """Metrics for eval.json and `tunesmith eval`: `evaluate` plus what is too slow to run at every
        validation (generation, per-example listings). out_dir: where to write per-example files
        (samples, misclassified examples), or None."""
        return self.evaluate(model, features, batch_size)

    def loggable(self, metrics: dict) -> dict:
        """The scalar part of `metrics`, for metrics.jsonl."""
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def predict(self, model, processor, inputs: list) -> list[dict]:
        raise NotImplementedError


def batches(task: Task, features: list[dict], batch_size: int, device):
    """(indices, batch) over `features` sorted by length (less padding); indices map back to order."""
    order = sorted(range(len(features)), key=lambda i: task.length(features[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, {k: v.to(device) for k, v in task.collate([features[i] for i in idx]).items()}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                "attention_dropout", "hidden_dropout", "classifier_dropout_prob", "activation_dropout",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "drop_path_rate")


def load_hf(auto_cls, model_cfg, **config_kwargs):
    """An HF model from a bundled alias, hub id or folder; `pretrained: false` keeps only the config.

    config_kwargs set task fields (num_labels, id2label, ...); `model.dropout` overrides every dropout
    probability the config has.
    """
    from transformers import AutoConfig

    from tunesmith.assets import resolve_model

    path = resolve_model(model_cfg.name)
    config = AutoConfig.from_pretrained(path, revision=model_cfg.revision, **config_kwargs)
    if model_cfg.dropout is not None:
        for key in DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, model_cfg.dropout)
    if not model_cfg.pretrained:
        return auto_cls.from_config(config), path
    # a checkpoint's own head (other label count) is replaced: that is the point of fine-tuning
    model = auto_cls.from_pretrained(path, config=config, revision=model_cfg.revision,
                                     ignore_mismatched_sizes=True)
    return model, path
