"""The doctor's object-detection checks (tunesmith/diagnosis/boxes.py) on tiny generated images: rejected boxes with
their provenance, images without boxes, duplicate boxes, class balance by boxes and by images, the small-box share
and images leaked across splits by their bytes."""
import json
import shutil

import numpy as np
from PIL import Image

from tunesmith.diagnosis.boxes import box_findings, box_lines

NAMES = ["cat", "dog", "bird"]


def image(path, seed: int):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return str(path)


def row(path, boxes, labels, source="train.json"):
    return {"image": path, "width": 32, "height": 24, "boxes": boxes, "labels": labels,
            "where": [f"{source}#{i}" for i in range(len(boxes))]}


def test_rejected_boxes_are_counted_by_kind_with_their_provenance(tmp_path):
    rows = {"train": [row(image(tmp_path / "a.png", 0), [[0, 0, 5, 5]], ["cat"])]}
    rejected = [("labels/a.txt:3", "box outside the image: x1 40.0 > width 32"),
                ("labels/a.txt:4", "box outside the image: x1 33.5 > width 32"),
                ("train.json#17", "zero or negative area: [3.0, 3.0, 3.0, 8.0]"),
                ("train.json#18", "unknown class id 7")]
    section, warnings, blocking = box_findings(rows, NAMES, rejected, listed=1)
    r = section["rejected"]
    assert r["count"] == 4 and sum(r["kinds"].values()) == 4 and r["kinds"]["box outside the image"] == 2
    assert r["examples"]["box outside the image"] == [{"where": "labels/a.txt:3",
                                                       "reason": "box outside the image: x1 40.0 > width 32"}]
    assert len(r["examples"]) == 3 and not blocking
    assert not any("rejected" in w for w in warnings)     # the shared doctor's "unusable row(s)" line says it
    _, warnings, blocking = box_findings(rows, NAMES, rejected, bad_rows="error")
    assert not blocking and not any("rejected" in w for w in warnings)
    section, warnings, blocking = box_findings(rows, NAMES, [])
    assert section["rejected"] == {"count": 0, "kinds": {}, "examples": {}} and not blocking


def test_images_without_boxes_are_counted_and_kept_and_all_empty_train_blocks(tmp_path):
    a, b, c = (image(tmp_path / f"{n}.png", i) for i, n in enumerate("abc"))
    rows = {"train": [row(a, [[0, 0, 10, 10]], ["cat"]), row(b, [], []), row(c, [], [])]}
    section, warnings, blocking = box_findings(rows, NAMES, [])
    assert section["splits"]["train"]["negatives"] == 2 and section["negatives"]["train"] == [b, c]
    assert section["splits"]["train"]["images"] == 3 and not blocking
    assert any("2 of 3 image(s) have no box" in w and "kept" in w for w in warnings)
    _, _, blocking = box_findings({"train": rows["train"][1:]}, NAMES, [])
    assert len(blocking) == 1 and "nothing to learn" in blocking[0]


def test_duplicate_boxes_same_class_high_overlap(tmp_path):
    a = image(tmp_path / "a.png", 0)
    boxes = [[0, 0, 20, 20], [0, 0, 20, 20.2],        # IoU 0.99, same class: a duplicate
             [0, 0, 20, 20],                          # the same box as another class: not a duplicate
             [10, 10, 30, 22], [10, 10, 30, 20.8]]    # IoU 0.9: two objects, not flagged
    rows = {"train": [row(a, boxes, ["cat", "cat", "dog", "bird", "bird"])]}
    section, warnings, _ = box_findings(rows, NAMES, [])
    d = section["duplicates"]["train"]
    assert section["splits"]["train"]["duplicates"] == 1 and len(d) == 1
    assert d[0]["where"] == ["train.json#0", "train.json#1"] and d[0]["label"] == "cat" and d[0]["iou"] > 0.95
    assert any("1 duplicate box(es)" in w and "train.json#1 repeats train.json#0" in w for w in warnings)


def test_class_balance_by_boxes_and_by_images(tmp_path):
    a, b, c = (image(tmp_path / f"{n}.png", i) for i, n in enumerate("abc"))
    rows = {"train": [row(a, [[0, 0, 5, 5], [6, 6, 12, 12], [13, 0, 20, 5]], ["cat", "cat", "cat"]),
                      row(b, [[0, 0, 5, 5], [6, 6, 12, 12]], ["cat", "dog"])],
            "test": [row(c, [[0, 0, 5, 5]], ["cat"], "test.json")]}
    section, warnings, _ = box_findings(rows, NAMES, [])
    bal = section["balance"]
    assert bal["boxes"]["train"] == {"cat": 4, "dog": 1, "bird": 0}
    assert bal["images"]["train"] == {"cat": 2, "dog": 1, "bird": 0}
    assert bal["boxes"]["test"] == {"cat": 1, "dog": 0, "bird": 0} and bal["missing_in_train"] == ["bird"]
    assert any("train has no box of class(es) ['bird']" in w for w in warnings)
    assert not any(w.startswith("test has no box") for w in warnings)     # the shared class-balance line says it


def test_small_box_share(tmp_path):
    a = image(tmp_path / "a.png", 0)
    small, large = [0, 0, 10, 10], [0, 0, 40, 40]         # areas 100 and 1,600 px against 32^2 = 1,024
    rows = {"train": [{**row(a, [small, large, large, large], ["cat"] * 4), "width": 64, "height": 64}]}
    section, warnings, _ = box_findings(rows, NAMES, [])
    s = section["splits"]["train"]
    assert s["tiny"] == 1 and s["tiny_share"] == 0.25 and s["boxes"] == 4 and s["side_px"]["p50"] == 40.0
    assert any("25% of boxes are under 32 x 32 px" in w for w in warnings)
    rows["train"][0]["boxes"] = [small, large, large, large, large]
    rows["train"][0]["labels"], rows["train"][0]["where"] = ["cat"] * 5, ["x"] * 5
    section, warnings, _ = box_findings(rows, NAMES, [])
    assert section["splits"]["train"]["tiny_share"] == 0.2 and not any("32 x 32" in w for w in warnings)


def test_images_leaked_across_splits_by_content(tmp_path):
    a, b, c = (image(tmp_path / f"{n}.png", i) for i, n in enumerate("abc"))
    copy = str(tmp_path / "renamed.png")
    shutil.copy(a, copy)                                   # another name, the same bytes
    twin = str(tmp_path / "twin.png")
    shutil.copy(b, twin)
    box = [[0, 0, 10, 10]]
    rows = {"train": [row(a, box, ["cat"]), row(b, box, ["cat"]), row(twin, box, ["cat"])],
            "validation": [row(c, box, ["cat"])],
            "test": [row(copy, box, ["cat"]), row(str(tmp_path / "missing.png"), box, ["cat"])]}
    section, warnings, _ = box_findings(rows, NAMES, [])
    assert json.loads(json.dumps(section)) == section          # doctor.json's "task" key as it is
    leak = section["leakage"]
    assert leak["by_splits"] == [{"splits": ["train", "test"], "images": 1}]
    assert leak["pairs"] == [{"split_a": "train", "image_a": a, "split_b": "test", "image_b": copy}]
    assert leak["within"] == {"train": 1} and leak["unreadable"] == [str(tmp_path / "missing.png")]
    assert not any("also in" in w or "appear twice" in w for w in warnings)   # the shared doctor's leakage lines
    lines = box_lines(section)                             # and the terminal shows the byte-level detail
    assert "same image bytes in train/test: 1" in lines and f"  {copy} (test) = {a} (train)" in lines
    assert "same image bytes twice in train: 1" in lines and any(str(tmp_path / "missing.png") in x for x in lines)
    Image.open(a).convert("L").save(copy)                  # same size and place, other bytes: no leak
    assert box_findings(rows, NAMES, [])[0]["leakage"]["by_splits"] == []
