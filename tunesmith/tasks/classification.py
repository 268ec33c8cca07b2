"""What every single-label classification task shares: labels, class weights, loss, metrics, predict.

Labels may be strings or integers in the data; names are kept as strings (id2label in the model
config), ordered as `data.labels` says or sorted (numerically when every label is an integer).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith import io, metrics
from tunesmith.errors import TunesmithError
from tunesmith.insight.fairness import MISSING, evaluate_slices, slice_value
from tunesmith.tasks.base import Task, batches, model_device


def label_name(value) -> str | None:
    """The string name of a label value, or None when the value cannot be a label."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


EXPLAIN_STEPS = 32         # Integrated Gradients: points on the path from the baseline to the input


def captum_attr():
    """captum.attr, or a one-line error naming the extra to install."""
    try:
        import captum.attr
    except ImportError:
        raise TunesmithError("explanations need captum: pip install 'tunesmith[explain]' (or: pip install captum)"
                             ) from None
    return captum.attr


PREDICTION_LABELS = 20     # probabilities kept per row in predictions.jsonl (the most probable labels)


class Classification(Task):
    prediction = "label"            # {"label", "probabilities"} (tunesmith/tasks/outputs.py)
    names: list[str] = []           # label names in id order (set by prepare or load_trained)
    weights: torch.Tensor | None = None
    distills = True                 # a student learns the teacher's logits (Distillation below)

    @property
    def labels(self) -> list[str]:
        return list(self.names)

    @property
    def class_weights(self):
        return self.recipe.train.class_weights

    @property
    def shots(self) -> int | None:
        return self.recipe.data.shots

    # --- labels -------------------------------------------------------------------------------------
    def check_label(self, row: dict, split: str) -> str | None:
        col = self.recipe.data.label_column
        if col not in row or row[col] is None or row[col] == "":
            return f"missing label (column '{col}')"
        name = label_name(row[col])
        if name is None:
            return f"label {row[col]!r} has the wrong type ({type(row[col]).__name__}); use a string or an integer"
        if split != "train" and self.names and name not in self.label2id:
            return f"label '{name}' never appears in train"
        return None

    def stratify_key(self, row: dict):
        return label_name(row.get(self.recipe.data.label_column))

    def prepare(self, rows: list[dict]) -> None:
        seen = {label_name(r[self.recipe.data.label_column]) for r in rows}
        if len(seen) < 2:                           # one output: a regression head, "accuracy" 1.0 by construction
            from tunesmith.data import DataError

            raise DataError(f"{self.recipe.data.train}: label column '{self.recipe.data.label_column}' has a single "
                            f"class {sorted(seen)} in the usable train rows; a classification task needs at least "
                            f"two classes")
        if self.recipe.data.labels is not None:
            names = [str(x) for x in self.recipe.data.labels]
            unknown = seen - set(names)
            if unknown:
                raise TunesmithError(f"train has labels not in data.labels: {sorted(unknown)}")
        elif all(s.lstrip("-").isdigit() for s in seen):
            names = sorted(seen, key=int)
        else:
            names = sorted(seen)
        self.set_labels(names)
        if self.recipe.data.test is None:        # the test split comes from these rows: check eval.slices now
            self.check_slice_columns([{c: slice_value(r, c) for c in self.recipe.eval.slices} for r in rows])
        counts = np.bincount([self.label2id[label_name(r[self.recipe.data.label_column])] for r in rows],
                             minlength=len(names))
        self.weights = self._class_weights(counts)

    def set_labels(self, names: list[str]) -> None:
        self.names = list(names)
        self.label2id = {n: i for i, n in enumerate(self.names)}

    def label_id(self, row: dict) -> int:
        return self.label2id[label_name(row[self.recipe.data.label_column])]

    def _class_weights(self, counts: np.ndarray) -> torch.Tensor | None:
        spec = self.recipe.train.class_weights
        if spec is None:
            return None
        if spec == "balanced":                     # n / (C * n_c), as scikit-learn defines it
            w = counts.sum() / (len(counts) * np.maximum(counts, 1))
        elif isinstance(spec, dict):
            unknown = set(spec) - set(self.names)
            if unknown:
                raise TunesmithError(f"train.class_weights names unknown labels {sorted(unknown)}; "
                                     f"labels: {self.names}")
            w = np.array([spec.get(n, 1.0) for n in self.names])
        else:
            if len(spec) != len(self.names):
                raise TunesmithError(f"train.class_weights has {len(spec)} values for {len(self.names)} labels "
                                     f"{self.names}")
            w = np.array(spec)
        return torch.tensor(w, dtype=torch.float32)

    @property
    def label_config(self) -> dict:
        # num_labels follows from id2label; passing both warns when the checkpoint had another label count
        return {"id2label": dict(enumerate(self.names)), "label2id": dict(self.label2id)}

    # --- training and evaluation --------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        """Sum over the batch of each example's cross-entropy, times its class weight (train.class_weights)."""
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits   # [B, C]
        weight = self.weights.to(logits.device) if self.weights is not None else None
        return F.cross_entropy(logits.float(), labels, weight=weight, reduction="sum",
                               label_smoothing=self.recipe.train.label_smoothing)

    def count(self, batch: dict) -> float:
        """Examples, or the sum of their class weights: cross_entropy's weighted mean divides by the same."""
        if self.weights is None:
            return float(len(batch["labels"]))
        return float(self.weights[batch["labels"].cpu()].sum())

    def distillation(self, temperature: float, alpha: float) -> Distillation:
        return Distillation(self, temperature, alpha)

    def logits(self, model, features: list[dict], batch_size: int) -> torch.Tensor:
        """[N, C] float logits in the order of `features`."""
        out = [None] * len(features)
        for idx, batch in batches(self, features, batch_size, model_device(model)):
            batch.pop("labels", None)
            for i, row in zip(idx, model(**batch).logits.float().cpu()):
                out[i] = row
        return torch.stack(out)

    def scores(self, model, features: list[dict], batch_size: int):
        """(metrics, labels [N], probs [N, C]) on labelled features: what evaluate and evaluate_final share."""
        logits = self.logits(model, features, batch_size)
        labels = torch.tensor([f["labels"] for f in features])
        probs = logits.softmax(-1)
        result = {"loss": float(F.cross_entropy(logits, labels))}
        result |= metrics.classification(labels.numpy(), probs.argmax(-1).numpy(), probs.numpy(), self.names)
        return result, labels, probs

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        return self.scores(model, features, batch_size)[0]

    def evaluate_final(self, model, rows: list[dict], features: list[dict], batch_size: int,
                       out_dir=None) -> dict:
        """`evaluate`'s metrics, the task's `final_metrics`, per-slice metrics and gaps (eval.slices:
        tunesmith/insight/fairness.py) and, with out_dir, predictions.jsonl: one {row, label, predicted, confidence,
        probabilities} per evaluated row (row: its position in `rows`, data/test.jsonl for a run's test split;
        probabilities: every label up to PREDICTION_LABELS labels, else the most probable ones)."""
        result, labels, probs = self.scores(model, features, batch_size)
        pred = probs.argmax(-1)
        result |= self.final_metrics(rows, labels, probs, out_dir)
        ev = self.recipe.eval
        if ev.slices:
            groups = {c: [slice_value(r, c) for r in rows] for c in ev.slices}
            self.check_slice_columns([{c: groups[c][i] for c in groups} for i in range(len(rows))])
            result["slices"], result["fairness"] = evaluate_slices(
                labels.numpy(), pred.numpy(), self.names, groups, ev.min_slice_size, ev.positive_label)
        if out_dir is not None:
            top = min(len(self.names), PREDICTION_LABELS)
            keep = probs.argsort(-1, descending=True)[:, :top].tolist()     # [N, top] class ids
            io.write_jsonl(Path(out_dir) / "predictions.jsonl", (
                {"row": i, "label": self.names[int(labels[i])], "predicted": self.names[int(pred[i])],
                 "confidence": round(float(p.max()), 6),
                 "probabilities": {self.names[c]: round(float(p[c]), 6) for c in keep[i]}}
                for i, p in enumerate(probs)))
        return result

    def final_metrics(self, rows: list[dict], labels: torch.Tensor, probs: torch.Tensor, out_dir) -> dict:
        """A classification task's own additions to the final metrics and per-example files (labels: [N] ids,
        probs: [N, C] softmax); none by default."""
        return {}

    def check_slice_columns(self, values: list[dict]) -> None:
        """eval.slices names columns of the test data: one that no row has is a mistake in the recipe."""
        absent = [c for c in self.recipe.eval.slices if values and all(v[c] == MISSING for v in values)]
        if absent:
            raise TunesmithError(f"eval.slices: no test row has column(s) {absent}")

    def predictions(self, logits: torch.Tensor) -> list[dict]:
        probs = logits.softmax(-1)
        return [{"label": self.names[int(p.argmax())],
                 "probabilities": {n: round(float(x), 6) for n, x in zip(self.names, p)}} for p in probs]


class Distillation:
    """The objective of a student classifier (Hinton et al., 2015), summed over examples as fit() asks:
        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy(true label)
    Train features carry `teacher`: the teacher's logits ([C], Task.teacher_outputs). Every example weighs 1, in
    the sum and in `count` (train.class_weights shaped the teacher, not this loss)."""

    validates = True

    def __init__(self, task: Classification, temperature: float, alpha: float):
        self.task, self.temperature, self.alpha = task, temperature, alpha

    def finish(self, model, batch_size: int, say) -> None:
        """Nothing after fit: the student's head trained with it."""

    def collate(self, features: list[dict]) -> dict:
        batch = self.task.collate(features)
        batch["teacher"] = torch.tensor([f["teacher"] for f in features])            # [B, C]
        return batch

    def loss(self, model, batch: dict) -> torch.Tensor:
        t = self.temperature
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "teacher")}).logits.float()
        soft = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(batch["teacher"].float() / t, -1),
                        log_target=True, reduction="sum") * t * t
        hard = F.cross_entropy(logits, batch["labels"], reduction="sum")
        return self.alpha * soft + (1 - self.alpha) * hard

    def count(self, batch: dict) -> float:
        return float(len(batch["labels"]))
