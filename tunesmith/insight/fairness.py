"""Per-slice evaluation: how a classifier does on each value of a column (speaker, gender, source), and gaps.

    slices:   {column: {value: {accuracy, f1_macro, precision_macro, recall_macro, selection_rate,
                                true_positive_rate, n}}}        a slice under min_size rows: {n, too_small: note}
    fairness: {column: {gaps: {metric: {best, worst, best_value, worst_value, difference}},
                        demographic_parity_difference, equal_opportunity_difference, positive_label,
                        judged: [values], too_small: [values]}}

Only slices of at least `min_size` rows are judged. Demographic parity difference: the largest minus the
smallest share of rows predicted as the positive class; equal opportunity difference: the same for the true
positive rate (recall of the positive class; slices without positive rows are left out of it). With several
positive classes (more than two labels and no positive_label) both are the largest over classes, one-vs-rest;
`selection_rate` and `true_positive_rate` are then {label: rate}. Pure numpy: no torch, no task.
"""
from __future__ import annotations

import numpy as np

MISSING = "(missing)"           # the slice of rows without a value in the column
GAP_METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro")


def positives(names: list[str], positive_label) -> list[str]:
    """The class(es) taken as positive for the parity gaps."""
    if positive_label is not None:
        if str(positive_label) not in names:
            from tunesmith.errors import TunesmithError
            raise TunesmithError(f"eval.positive_label '{positive_label}' is not a label; labels: {names}")
        return [str(positive_label)]
    return [names[1]] if len(names) == 2 else list(names)


def slice_value(row: dict, column: str) -> str:
    value = row.get(column)
    return MISSING if value is None or value == "" else str(value)


def _scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, pos: list[int]) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    ids = list(range(n_classes))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    sel = {c: float((y_pred == c).mean()) for c in pos}
    tpr = {c: float((y_pred[y_true == c] == c).mean()) if (y_true == c).any() else None for c in pos}
    return {"accuracy": float((y_true == y_pred).mean()), "f1_macro": float(f), "precision_macro": float(p),
            "recall_macro": float(r), "selection_rate": sel, "true_positive_rate": tpr, "n": int(len(y_true))}


def _spread(rates: list[dict], pos: list[int]) -> float | None:
    """Largest (max - min over slices) over the positive classes; None values (undefined rates) left out."""
    best = None
    for c in pos:
        values = [r[c] for r in rates if r[c] is not None]
        if len(values) >= 2:
            best = max(best or 0.0, max(values) - min(values))
    return best


def evaluate_slices(y_true, y_pred, names: list[str], groups: dict[str, list[str]], min_size: int,
                    positive_label=None) -> tuple[dict, dict]:
    """(slices, fairness) as the module docstring says. y_true, y_pred: [N] class ids; groups: column -> [N]
    slice values (strings)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    pos_names = positives(names, positive_label)
    pos = [names.index(p) for p in pos_names]
    name_of = lambda rates: (rates[pos[0]] if len(pos) == 1 else {names[c]: v for c, v in rates.items()})
    slices, fairness = {}, {}
    for column, values in groups.items():
        values = np.asarray(values, dtype=object)
        table, judged, raw = {}, [], {}
        for value in sorted(set(values.tolist())):
            m = values == value
            n = int(m.sum())
            if n < min_size:
                table[value] = {"n": n, "too_small": f"too small to judge ({n} < eval.min_slice_size {min_size})"}
                continue
            raw[value] = _scores(y_true[m], y_pred[m], len(names), pos)
            table[value] = {**raw[value], "selection_rate": name_of(raw[value]["selection_rate"]),
                            "true_positive_rate": name_of(raw[value]["true_positive_rate"])}
            judged.append(value)
        slices[column] = table
        out = {"positive_label": pos_names[0] if len(pos_names) == 1 else pos_names, "judged": judged,
               "too_small": [v for v in table if v not in raw]}
        if len(judged) < 2:
            out["note"] = f"fewer than two slices of at least {min_size} rows: no gap to judge"
        else:
            gaps = {}
            for metric in GAP_METRICS:
                best = max(judged, key=lambda v: raw[v][metric])
                worst = min(judged, key=lambda v: raw[v][metric])
                gaps[metric] = {"best_value": best, "worst_value": worst, "best": raw[best][metric],
                                "worst": raw[worst][metric], "difference": raw[best][metric] - raw[worst][metric]}
            out["gaps"] = gaps
            out["demographic_parity_difference"] = _spread([raw[v]["selection_rate"] for v in judged], pos)
            out["equal_opportunity_difference"] = _spread([raw[v]["true_positive_rate"] for v in judged], pos)
        fairness[column] = out
    return slices, fairness


def largest_gap(fairness: dict) -> tuple[str, str, dict] | None:
    """(column, metric, gap) of the largest best-minus-worst difference over every column and metric."""
    found = [(col, metric, gap) for col, f in fairness.items() for metric, gap in (f.get("gaps") or {}).items()]
    return max(found, key=lambda x: x[2]["difference"]) if found else None
