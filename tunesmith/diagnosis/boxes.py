"""The data doctor's checks on object-detection data: the task's `data_findings` returns `box_findings(...)`.

box_findings(rows_by_split, names, rejected) -> (section, warnings, blocking), the shape of Task.data_findings:
  rows_by_split  {split: [row]}, the usable rows, one per image:
                 {"image": path, "width": int, "height": int, "boxes": [[x0, y0, x1, y1], ...] float pixels,
                  "labels": [class name, ...], "where": ["file:line" or "file#id", ...] one per box}
  names          the class names in id order
  rejected       [(where, reason)]: the boxes the readers refused (outside the image, zero or negative area,
                 unknown class id), in file order

Lines the shared doctor already says are not repeated here (each finding is said once; this section keeps their
box-level detail): rejected boxes are its "N unusable row(s)" (a rejected box is a table reject), a class missing
from a held-out split is its class-balance line, and images in two splits or twice in one are its leakage and
duplicate lines (Task.key: a hash of the decoded pixels, so also the same picture in another container).

doctor.json's "task" section (every list is cut at `listed` entries; counts are whole):
  rejected     {count, kinds: {kind: n}, examples: {kind: [{where, reason}]}}  a reason's kind is it without values
  splits       {split: {images, boxes, negatives, duplicates, tiny, tiny_share, side_px: {p10, p50, p90}}}
               negatives: images without boxes (kept: they teach the model what is background);
               tiny: boxes under 32 x 32 px in the original image (COCO's "small"); side_px: sqrt(box area)
  negatives    {split: [image]}
  duplicates   {split: [{image, label, iou, where: [first, second]}]}   same class, IoU > 0.95, same image
  balance      {labels, boxes: {split: {name: n}}, images: {split: {name: n}}, missing_in_train: [name]}
               images: how many images hold at least one box of the class
  leakage      {by_splits: [{splits: [a, b], images}], within: {split: n}, pairs: [{split_a, image_a, split_b,
               image_b}], unreadable: [image]}   the same file bytes (sha256) in two splits, or twice in one

box_lines(section, listed) -> the section as terminal lines (Detection.findings_lines: `tunesmith doctor` prints
them): per split images, boxes, images without boxes, duplicates, small boxes and box sides; rejected boxes by kind
with examples; the images without boxes, the duplicate boxes, class balance by images and leaked images.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from tunesmith.diagnosis.checks import reason_kind

SMALL = 32 * 32             # COCO's small objects: area under 32^2 px
DUPLICATE_IOU = 0.95        # two boxes of one class overlapping this much in one image mark one object twice
TINY_WARN = 0.25            # share of train boxes that are small before the doctor warns


def box_findings(rows_by_split: dict[str, list[dict]], names: list[str], rejected: list[tuple[str, str]],
                 listed: int = 20, bad_rows: str = "skip") -> tuple[dict, list[str], list[str]]:
    """The section, warning lines and blocking lines (see the module docstring). bad_rows: data.bad_rows; under
    "error" rejected boxes are blocking (training stops on them), under "skip" a warning (training drops them)."""
    warnings, blocking = [], []
    section = {"rejected": _rejected(rejected, listed, bad_rows, warnings, blocking), "splits": {},
               "negatives": {}, "duplicates": {}}
    for split, rows in rows_by_split.items():
        stats, negatives, dups = _split(rows, listed)
        section["splits"][split] = stats
        section["negatives"][split], section["duplicates"][split] = negatives, dups
        if stats["images"] and not stats["boxes"] and split == "train":
            blocking.append("train: no image has a box: there is nothing to learn; check the labels' format and "
                            "paths (data.format)")
        elif stats["negatives"]:
            warnings.append(f"{split}: {stats['negatives']:,} of {stats['images']:,} image(s) have no box, e.g. "
                            f"{negatives[0]}: kept as background-only examples")
        if stats["duplicates"]:
            first = dups[0]["where"]
            warnings.append(f"{split}: {stats['duplicates']:,} duplicate box(es) (same class, IoU > "
                            f"{DUPLICATE_IOU}), e.g. {first[1]} repeats {first[0]}: they teach the model to predict "
                            f"one object twice; remove them")
        if split == "train" and stats["boxes"] and stats["tiny_share"] >= TINY_WARN:
            warnings.append(f"train: {stats['tiny_share']:.0%} of boxes are under 32 x 32 px (median side "
                            f"{stats['side_px']['p50']:g} px): DETR-family models find small objects poorly at "
                            f"their processor's size; keep the images large or cut them into tiles")
    section["balance"] = _balance(rows_by_split, names, warnings)
    section["leakage"] = _leakage(rows_by_split, listed, warnings)
    return section, warnings, blocking


def _rejected(rejected, listed, bad_rows, warnings, blocking) -> dict:
    kinds = Counter(reason_kind(reason) for _, reason in rejected)
    examples = defaultdict(list)
    for where, reason in rejected:
        shown = examples[reason_kind(reason)]
        if len(shown) < listed:
            shown.append({"where": where, "reason": reason})
    return {"count": len(rejected), "kinds": dict(kinds.most_common()), "examples": dict(examples)}


def _split(rows: list[dict], listed: int) -> tuple[dict, list[str], list[dict]]:
    """(counts, images without boxes, duplicate boxes) of one split."""
    negatives, dups, areas, n_dups = [], [], [], 0
    for row in rows:
        boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4)
        if not len(boxes):
            negatives.append(row["image"])
            continue
        areas.append(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
        for i, j, iou in _duplicates(boxes, row["labels"]):
            n_dups += 1
            if len(dups) < listed:
                dups.append({"image": row["image"], "label": row["labels"][i], "iou": round(iou, 4),
                             "where": [row["where"][i], row["where"][j]]})
    area = np.concatenate(areas) if areas else np.zeros(0)
    side = np.sqrt(area)
    stats = {"images": len(rows), "boxes": int(len(area)), "negatives": len(negatives), "duplicates": n_dups,
             "tiny": int((area < SMALL).sum()), "tiny_share": round(float((area < SMALL).mean()), 6) if len(area)
             else 0.0, "side_px": {f"p{q}": round(float(np.percentile(side, q)), 1) if len(side) else None
                                   for q in (10, 50, 90)}}
    return stats, negatives[:listed], dups


def _duplicates(boxes: np.ndarray, labels: list) -> list[tuple[int, int, float]]:
    """(i, j, IoU) for i < j of the same label with IoU > DUPLICATE_IOU; j is the repeat."""
    x0, y0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0]), np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1, y1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2]), np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-12)
    same = np.asarray(labels, dtype=object)[:, None] == np.asarray(labels, dtype=object)[None, :]
    i, j = np.nonzero(np.triu((iou > DUPLICATE_IOU) & same, k=1))
    return [(int(a), int(b), float(iou[a, b])) for a, b in zip(i, j)]


def _balance(rows_by_split, names, warnings) -> dict:
    boxes = {s: Counter(label for r in rows for label in r["labels"]) for s, rows in rows_by_split.items()}
    images = {s: Counter(label for r in rows for label in set(r["labels"])) for s, rows in rows_by_split.items()}
    labels = list(names) + sorted({n for c in boxes.values() for n in c} - set(names), key=str)
    train = boxes.get("train", Counter())
    missing = [n for n in names if not train[n]]
    if missing and sum(train.values()):
        warnings.append(f"train has no box of class(es) {missing}: the model cannot learn them")
    return {"labels": [str(n) for n in labels],
            "boxes": {s: {str(n): int(c[n]) for n in labels} for s, c in boxes.items()},
            "images": {s: {str(n): int(c[n]) for n in labels} for s, c in images.items()},
            "missing_in_train": missing}


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _leakage(rows_by_split, listed, warnings) -> dict:
    hashes, unreadable = {}, []
    for rows in rows_by_split.values():
        for row in rows:
            if row["image"] not in hashes:
                try:
                    hashes[row["image"]] = file_hash(row["image"])
                except OSError:
                    hashes[row["image"]] = None
                    unreadable.append(row["image"])
    seen: dict[str, tuple[str, str]] = {}          # hash -> (split, image) of its first appearance
    within, by_pair, pairs = Counter(), Counter(), []
    for split, rows in rows_by_split.items():
        here = set()
        for row in rows:
            h = hashes[row["image"]]
            if h is None:
                continue
            if h in here:
                within[split] += 1
            elif h in seen and seen[h][0] != split:
                first_split, first_image = seen[h]
                by_pair[first_split, split] += 1
                if len(pairs) < listed:
                    pairs.append({"split_a": first_split, "image_a": first_image, "split_b": split,
                                  "image_b": row["image"]})
            here.add(h)
            seen.setdefault(h, (split, row["image"]))
    if unreadable:
        warnings.append(f"{len(unreadable):,} image(s) could not be read for the leakage check, e.g. {unreadable[0]}")
    return {"by_splits": [{"splits": [a, b], "images": n} for (a, b), n in by_pair.items()],
            "within": dict(within), "pairs": pairs, "unreadable": unreadable[:listed]}


def box_lines(section: dict, listed: int = 20) -> list[str]:
    """doctor.json's task section (box_findings) as the lines `tunesmith doctor` prints; every list cut at `listed`."""
    from tunesmith import io

    def grid(header, rows):
        return io.table(header, rows, digits=3).splitlines()

    splits = section["splits"]
    out = grid(["split", "images", "boxes", "without boxes", "duplicates", "under 32x32", "side p10/p50/p90 px"],
               [[s, x["images"], x["boxes"], x["negatives"], x["duplicates"], f"{x['tiny']:,} ({x['tiny_share']:.1%})",
                 "/".join("-" if v is None else f"{v:g}" for v in x["side_px"].values())] for s, x in splits.items()])
    r = section["rejected"]
    out.append(f"rejected boxes: {r['count']:,}" + (" (each in the unusable rows), by kind:" if r["count"] else ""))
    for kind, n in r["kinds"].items():
        shown = [x["where"] for x in r["examples"].get(kind, [])[:3]]
        out.append(f"  {n:,} x {kind}, e.g. " + ", ".join(shown) + (" ..." if n > len(shown) else ""))
    for split, images in section["negatives"].items():
        n = splits[split]["negatives"]
        if n:
            out.append(f"{split}: {n:,} image(s) without boxes (kept as background): " + ", ".join(images[:3])
                       + (" ..." if n > 3 else ""))
    dups = [(s, d) for s, items in section["duplicates"].items() for d in items]
    for split, d in dups[:listed]:
        out.append(f"duplicate {split}: {d['where'][1]} repeats {d['where'][0]} ({d['label']}, IoU {d['iou']:.3f}) "
                   f"in {d['image']}")
    total = sum(x["duplicates"] for x in splits.values())
    if total > min(len(dups), listed):
        out.append(f"... and {total - min(len(dups), listed):,} more duplicate box(es) (doctor.json lists {listed} "
                   f"per split)")
    bal = section["balance"]
    out += ["images holding each class:", *("  " + line for line in grid(
        ["label", *bal["images"]], [[n, *(bal["images"][s][n] for s in bal["images"])] for n in bal["labels"]]))]
    leak = section["leakage"]
    out += [f"same image bytes in {'/'.join(x['splits'])}: {x['images']:,}" for x in leak["by_splits"]]
    out += [f"same image bytes twice in {s}: {n:,}" for s, n in leak["within"].items()]
    out += [f"  {p['image_b']} ({p['split_b']}) = {p['image_a']} ({p['split_a']})" for p in leak["pairs"][:listed]]
    if leak["unreadable"]:
        out.append(f"unreadable for the byte check: {len(leak['unreadable']):,}, e.g. {leak['unreadable'][0]}")
    return out
