"""The data doctor's checks on rows: duplicates, conflicting labels, leakage, class balance, token lengths.

Every function takes plain lists (keys, labels, origins) per split, so it knows nothing about tasks; see
tunesmith/diagnosis/diagnose.py for how they are gathered through the Task protocol and for the doctor.json layout.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from itertools import combinations

import numpy as np

SHINGLE = 5                             # characters per shingle for text near duplicates
BLOCK = 2 ** 24                         # similarities per block: [rows, N] floats, 64 MB


def _rows_per_block(n: int) -> int:
    return max(1, min(1024, BLOCK // max(n, 1)))


def normalise(text: str) -> str:
    """Case, width, punctuation and whitespace folded: 'The  Movie!' and 'the movie' compare equal."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def excerpt(text: str, width: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


_VALUE = re.compile(r"(?<!column )'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\{[^}]*\}|\b(True|False|None)\b"
                    r"|\b0x[0-9a-f]+\b|(?<![\w-])-?\d+(\.\d+)?\b")     # quoted, bracketed, constants, numbers


def reason_kind(reason: str) -> str:
    """A reason without its details and values, to count rejects by kind: "malformed JSON: Expecting
    value: line 1 column 2" -> "malformed JSON"; "label 'x' never appears ..." -> "label … never appears ..."."""
    return _VALUE.sub("…", reason.split(": ")[0])


# --- duplicates within a split ----------------------------------------------------------------------

def duplicates(keys: list[str], labels: list | None, origins: list[str]) -> dict:
    """Groups of rows of one split with the same input (exact), and with the same input up to case,
    whitespace and punctuation written two or more ways (normalised)."""
    exact, norm = defaultdict(list), defaultdict(list)
    for i, k in enumerate(keys):
        exact[k].append(i)
        norm[normalise(k)].append(i)

    def group(index: list[int]) -> dict:
        out = {"text": excerpt(keys[index[0]]), "origins": [origins[i] for i in index]}
        if labels is not None:
            out["labels"] = [labels[i] for i in index]
        return out

    return {
        "exact_extra": len(keys) - len(exact),          # rows an exact dedup would drop
        "normalised_extra": len(exact) - len(norm),     # further rows a normalised dedup would drop
        "exact": [group(g) for g in exact.values() if len(g) > 1],
        "normalised": [group(g) for g in norm.values() if len({keys[i] for i in g}) > 1],
    }


def conflicts(keys: dict[str, list[str]], labels: dict[str, list], origins: dict[str, list[str]]) -> list[dict]:
    """Groups of rows, over all splits, with the same normalised input and different labels."""
    groups = defaultdict(list)
    for split, ks in keys.items():
        for i, k in enumerate(ks):
            groups[normalise(k)].append((split, i))
    return [{"text": excerpt(keys[g[0][0]][g[0][1]]), "origins": [origins[s][i] for s, i in g],
             "splits": [s for s, _ in g], "labels": [labels[s][i] for s, i in g]}
            for g in groups.values() if len({labels[s][i] for s, i in g}) > 1]


# --- leakage across splits ----------------------------------------------------------------------------

def near_text(keys_a: list[str], keys_b: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """(b index, best a index, Jaccard similarity) for each b row whose character 5-gram set (of the
    normalised text) shares at least `threshold` of its union with some a row. Exact, by sparse products."""
    from sklearn.feature_extraction.text import CountVectorizer

    if not keys_a or not keys_b:
        return []
    a = [normalise(k) for k in keys_a]
    b = [normalise(k) for k in keys_b]
    vec = CountVectorizer(analyzer="char", ngram_range=(SHINGLE, SHINGLE), lowercase=False, binary=True,
                          dtype=np.float32)
    try:
        vec.fit(a + b)
    except ValueError:                                  # every text shorter than a shingle
        return []
    xa, xb = vec.transform(a), vec.transform(b)         # [Na, V], [Nb, V] 0/1 shingle sets
    size_a, size_b = np.asarray(xa.sum(1)).ravel(), np.asarray(xb.sum(1)).ravel()
    xa_t = xa.T.tocsr()
    out, step = [], _rows_per_block(xa.shape[0])
    for s in range(0, xb.shape[0], step):
        inter = (xb[s:s + step] @ xa_t).toarray()       # [step, Na] shared shingles
        sim = inter / np.maximum(size_b[s:s + step, None] + size_a[None, :] - inter, 1)
        best = sim.argmax(1)
        for j in np.flatnonzero(sim[np.arange(len(best)), best] >= threshold):
            out.append((s + int(j), int(best[j]), float(sim[j, best[j]])))
    return out


def near_vectors(va: np.ndarray, vb: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(b index, best a index, cosine) for each b vector with cosine >= threshold to some a vector."""
    if not len(va) or not len(vb):
        return []
    na = va / np.maximum(np.linalg.norm(va, axis=1, keepdims=True), 1e-12)
    nb = vb / np.maximum(np.linalg.norm(vb, axis=1, keepdims=True), 1e-12)
    out, step = [], _rows_per_block(len(na))
    for s in range(0, len(nb), step):
        sim = nb[s:s + step] @ na.T                     # [step, Na]
        best = sim.argmax(1)
        for j in np.flatnonzero(sim[np.arange(len(best)), best] >= threshold):
            out.append((s + int(j), int(best[j]), float(sim[j, best[j]])))
    return out


def leakage(keys: dict[str, list[str]] | None, origins: dict[str, list[str]], near) -> dict:
    """Rows of a later split (validation, test) whose input also appears in an earlier one, by pair.

    keys: inputs per split (None: exact and normalised checks unavailable); near(a, b) -> [(j, i, sim)]
    for splits a, b, or None. Each b row is listed once, with its closest a row and the kind of match."""
    pairs, summary = [], []
    for a, b in combinations(list(origins), 2):
        found = {}                                      # b index -> (kind, a index, similarity)
        if keys is not None:
            first_exact, first_norm = {}, {}
            for i, k in enumerate(keys[a]):
                first_exact.setdefault(k, i)
                first_norm.setdefault(normalise(k), i)
            for j, k in enumerate(keys[b]):
                if k in first_exact:
                    found[j] = ("exact", first_exact[k], 1.0)
                elif normalise(k) in first_norm:
                    found[j] = ("normalised", first_norm[normalise(k)], 1.0)
        if near is not None:
            for j, i, sim in near(a, b):
                found.setdefault(j, ("near", i, sim))
        count = Counter(kind for kind, _, _ in found.values())
        summary.append({"splits": [a, b], "exact": count["exact"], "normalised": count["normalised"],
                        "near": count["near"]})
        for j in sorted(found):
            kind, i, sim = found[j]
            pairs.append({"kind": kind, "similarity": round(sim, 4), "split_a": a, "origin_a": origins[a][i],
                          "split_b": b, "origin_b": origins[b][j],
                          "text_a": excerpt(keys[a][i]) if keys else None,
                          "text_b": excerpt(keys[b][j]) if keys else None})
    return {"by_splits": summary, "pairs": pairs}


# --- class balance ------------------------------------------------------------------------------------

def balance(labels: dict[str, list], ratio_limit: float, class_weights, split_off: set[str],
            unit: str = "rows") -> dict:
    """Label counts per split; train skew (largest / smallest class), classes missing from a split, and
    label shares that differ between train and a validation/test file. Suggestions say what to change.
    unit: what one label counts (Task.balance_unit): "rows" (one label a row, the splits are stratified by it
    and train.class_weights weighs it), or a part of a row ("entities"), for which those two suggestions do
    not apply."""
    counts = {s: Counter(v) for s, v in labels.items()}
    names = [n for n, _ in counts["train"].most_common()]
    names += sorted({n for c in counts.values() for n in c} - set(names), key=str)
    train = counts["train"]
    ratio = max(train.values()) / max(min(train.values()), 1)
    per_row = unit == "rows"
    warnings, suggestions = [], []
    if ratio > ratio_limit:
        warnings.append(f"train is skewed: largest class / smallest = {ratio:.1f}" + ("" if per_row else
                        f" in {unit}") + f" (> doctor.imbalance_ratio {ratio_limit:g})")
        if class_weights is None and per_row:
            suggestions.append("set train.class_weights: balanced (weights the loss by n / (classes x count))")
        suggestions.append("select and compare runs by f1_macro (train.metric: f1_macro), not accuracy")
    for split, c in counts.items():
        missing = [n for n in names if train[n] and not c[n]]
        if split != "train" and missing and sum(c.values()):       # an empty split is already blocking
            warnings.append(f"{split} has no {unit} of class(es) {missing}: their scores cannot be measured")
        gap = 0.5 * sum(abs(c[n] / max(sum(c.values()), 1) - train[n] / sum(train.values())) for n in names)
        if split != "train" and split not in split_off and sum(c.values()) and gap > 0.1:
            warnings.append(f"label shares in {split} differ from train by {gap:.0%} (total variation)")
            if per_row:
                suggestions.append(f"leave data.{split} unset so tunesmith splits it from train, stratified by label")
    return {"available": True, "unit": unit, "labels": [str(n) for n in names],
            "counts": {s: {str(n): int(c[n]) for n in names} for s, c in counts.items()},
            "train_ratio": round(float(ratio), 3), "warnings": warnings, "suggestions": suggestions}


# --- token lengths ------------------------------------------------------------------------------------

def lengths(stats: dict, limit: int, origins: list[str]) -> dict:
    """Summary of Task.length_stats for one split: percentiles, share of examples and tokens cut at
    `limit`, share of trained tokens, and the origins of all-masked / unterminated / windowed examples."""
    kept = np.asarray(stats["kept"], dtype=np.int64)
    full = np.asarray(stats.get("lengths", kept), dtype=np.int64)
    out = {"examples": int(len(kept)), "limit": limit}
    if len(kept):
        for q in (50, 90, 99):
            out[f"p{q}"] = int(np.percentile(full, q))
        out["max"] = int(full.max())
    if "lengths" in stats and len(kept):
        cut = full > kept
        lost = int((full - kept).sum())
        out |= {"cut": int(cut.sum()), "cut_share": round(float(cut.mean()), 6),
                "tokens_cut": lost, "tokens_cut_share": round(lost / max(int(full.sum()), 1), 6)}
    if "trained" in stats:
        out["trained_tokens"] = int(np.sum(stats["trained"]))
        out["trained_share"] = round(float(np.sum(stats["trained"]) / max(kept.sum(), 1)), 6)
    for key in ("all_masked", "missing_end", "windowed"):
        if key in stats:
            out[key] = [origins[i] for i in stats[key]]
    return out
