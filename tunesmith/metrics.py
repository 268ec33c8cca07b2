"""Metrics shared by tasks. Classification metrics come from scikit-learn."""
from __future__ import annotations

import math

import numpy as np


def better(direction: str, new: float, old: float | None) -> bool:
    """Whether `new` improves on `old` for a metric whose better values are "max" or "min". A non-finite `new`
    never improves; anything finite improves on nothing (None, NaN)."""
    if not math.isfinite(new):
        return False
    if old is None or not math.isfinite(old):
        return True
    return new > old if direction == "max" else new < old


def improves(direction: str, new: float, best: float | None, delta: float, loss: float | None = None,
             best_loss: float | None = None, loss_delta: float = 0.0) -> bool:
    """Whether an evaluation is an improvement for epochs: auto (tunesmith/defaults.py min_delta): `new` beats
    `best` by at least `delta`; or it is not worse than `best` (a tie on a small validation split: accuracy moves
    in steps of 1/rows) and its validation `loss` is below `best_loss`, the loss at the best checkpoint, by at
    least `loss_delta`. Either margin keeps saturated data (accuracy 1.0, a loss creeping down) from counting
    every evaluation as an improvement and running to the cap."""
    if not math.isfinite(new):
        return False
    if best is None or not math.isfinite(best):
        return True
    gain = new - best if direction == "max" else best - new
    if gain >= delta:
        return True
    tied_loss = loss is not None and math.isfinite(loss) and best_loss is not None and math.isfinite(best_loss)
    return gain >= 0 and tied_loss and best_loss - loss >= loss_delta


def classification(y_true, y_pred, probs, names: list[str]) -> dict:
    """accuracy, macro/weighted P/R/F1, per-class table, confusion matrix, calibration error.

    y_true, y_pred: [N] class ids; probs: [N, C] softmax probabilities; names: C label names.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs)
    ids = list(range(len(names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    weighted = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="weighted", zero_division=0)
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "precision_macro": float(macro[0]),
        "recall_macro": float(macro[1]),
        "f1_macro": float(macro[2]),
        "f1_weighted": float(weighted[2]),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": {str(n): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, n in enumerate(names)},
        "confusion_matrix": {"labels": [str(n) for n in names],   # rows: true label, columns: predicted
                             "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist()},
        "n_examples": int(len(y_true)),
    }


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: SQuAD's answer normalisation."""
    import re
    import unicodedata

    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def generation(references: list[str], outputs: list[str]) -> dict:
    """exact_match: SQuAD's (equal after normalize_answer); rouge_l: mean ROUGE-L F1 from rouge-score (its own
    tokenizer: lower case, alphanumeric words), the figure papers and leaderboards report."""
    from rouge_score import rouge_scorer

    n = len(references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    em = sum(normalize_answer(r) == normalize_answer(o) for r, o in zip(references, outputs))
    rouge = sum(scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(references, outputs))
    return {"exact_match": em / n if n else float("nan"), "rouge_l": rouge / n if n else float("nan"),
            "n_examples": n}


def top_k_accuracy(y_true, probs, ks=(3, 5)) -> dict:
    """top{k}_accuracy: how often the true class is among the k most probable, for each k below the class count.
    y_true: [N] class ids; probs: [N, C]."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    ranked = np.argsort(-probs, axis=1, kind="stable")
    return {f"top{k}_accuracy": float((ranked[:, :k] == y_true[:, None]).any(1).mean()) if len(y_true) else float("nan")
            for k in ks if k < probs.shape[1]}


def expected_calibration_error(y_true, probs, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by bin size."""
    if len(y_true) == 0:
        return float("nan")
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - (pred[m] == y_true[m]).mean())
    return float(ece)


def entity_scores(y_true: list[list[str]], y_pred: list[list[str]], strict: bool = False) -> dict:
    """seqeval's entity-level scores: precision/recall/f1 (micro over entities), their macro averages over entity
    types, token accuracy and a per-type table. y_true, y_pred: one tag list per sentence ("B-PER", "O", ...).
    strict: seqeval's strict mode with the IOBES scheme (an entity counts only if its tags are valid BIOES);
    otherwise the default (conlleval) reading."""
    import warnings

    from seqeval.metrics import accuracy_score, classification_report
    from seqeval.scheme import IOBES

    kw = {"mode": "strict", "scheme": IOBES} if strict else {}
    with warnings.catch_warnings():                 # "X seems not to be NE tag" for O-only input, zero division
        warnings.simplefilter("ignore")
        table = classification_report(y_true, y_pred, output_dict=True, zero_division=0, **kw)
        accuracy = accuracy_score(y_true, y_pred) if any(y_true) else float("nan")
    averages = ("micro avg", "macro avg", "weighted avg")
    micro, macro = table.get("micro avg", {}), table.get("macro avg", {})
    return {
        "precision": float(micro.get("precision", 0.0)), "recall": float(micro.get("recall", 0.0)),
        "f1": float(micro.get("f1-score", 0.0)),
        "precision_macro": float(macro.get("precision", 0.0)), "recall_macro": float(macro.get("recall", 0.0)),
        "f1_macro": float(macro.get("f1-score", 0.0)),
        "accuracy": float(accuracy),
        "per_type": {t: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                         "f1": float(v["f1-score"]), "support": int(v["support"])}
                     for t, v in table.items() if t not in averages},
        "n_entities": int(micro.get("support", 0)),
    }
