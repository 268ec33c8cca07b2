"""Label-noise candidates by confident learning (cleanlab) on out-of-fold predictions.

A logistic regression on the pretrained model's embeddings (Task.embed) is fitted in k stratified folds;
each row is scored by the model that did not see it. cleanlab estimates, per pair of classes, how many
labels are wrong (the confident joint) and flags that many rows, ranked by self-confidence: the
out-of-fold probability of the row's given label (lowest first: the most confidently contradicted).
"""
from __future__ import annotations

import warnings

import numpy as np


def label_noise(vectors: np.ndarray, labels: list[str], folds: int, seed: int) -> dict:
    """vectors: [N, D] one embedding per row; labels: N label names. Returns
    {checked, skipped_rare, oof_accuracy, candidates: [{index, label, suggested, label_probability}]}
    with candidates ranked most suspicious first (indices into `labels`)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise ImportError("the label-noise check needs cleanlab: pip install cleanlab") from None
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    common = set(names[counts >= folds])                # a class needs a row in every fold
    keep = np.array([str(y) in common for y in labels])
    names = sorted(common)
    if len(names) < 2:
        return {"checked": 0, "skipped_rare": int((~keep).sum()), "oof_accuracy": None, "candidates": []}
    index = np.flatnonzero(keep)
    y = np.array([names.index(str(labels[i])) for i in index])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():                     # lbfgs convergence chatter on near-separable data
        warnings.simplefilter("ignore")
        probs = cross_val_predict(model, vectors[index], y, cv=cv, method="predict_proba")   # [n, C]
        ranked = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return {
        "checked": int(len(index)),
        "skipped_rare": int((~keep).sum()),
        "oof_accuracy": round(float((probs.argmax(1) == y).mean()), 4),
        "candidates": [{"index": int(index[k]), "label": names[y[k]], "suggested": names[int(probs[k].argmax())],
                        "label_probability": round(float(probs[k, y[k]]), 4)} for k in ranked],
    }
