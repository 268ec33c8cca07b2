"""Object detection without torch: the recipe (label format, image size, score threshold, box augmentation settings)
and the COCO scores of detections (faster-coco-eval, the `detection` extra; pycocotools computes the same numbers).

Boxes are [x0, y0, x1, y1] in pixels of the original image everywhere outside the model (rows, predictions,
eval.json's files); COCO's own files use [x, y, width, height] and are converted at their edge.
"""
from __future__ import annotations

from collections import Counter
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from tunesmith.recipe import DataConfig, EvalConfig, Guess, Recipe
from tunesmith.tasks.box_augment_schema import BoxAugment

# eval.json's COCO numbers, in the order of COCOeval.stats (AP: IoU .50:.95 unless named; AR: recall at most
# N detections an image); small/medium/large: objects under 32x32, 32x32-96x96, over 96x96 pixels (by area)
STATS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")
FORMATS = ("coco", "yolo", "voc")


class DetectionData(DataConfig):
    format: Literal["auto", "coco", "yolo", "voc"] = "auto"  # auto: a COCO .json, a YOLO data.yaml or folder of
                                                # .txt labels, a folder of VOC .xml files (tasks/box_readers.py)
    images: str | None = None                   # folder of the images when the labels name them relative to it
                                                # (COCO file_name, VOC filename); None: beside the label files
    names: list[str] | None = None              # class names in id order: YOLO without a data.yaml, or to fix the
                                                # order (COCO: the categories, VOC: sorted names in train)
    image_size: int | None = Field(None, ge=32)  # longest side the model sees (DETR-family: shortest_edge =
                                                # longest_edge = N; a fixed-size processor, RT-DETR: N x N); None:
                                                # the processor's own
    negatives: bool = True                      # images without boxes train as negatives; false: left out (counted)

    @field_validator("names")
    @classmethod
    def _names(cls, v):
        if v is not None and (not v or len(set(v)) != len(v) or not all(isinstance(n, str) and n for n in v)):
            raise ValueError("a list of distinct, non-empty class names")
        return v


class DetectionEval(EvalConfig):
    score_threshold: float = Field(0.5, ge=0, le=1)  # predict/serve keep boxes scoring above it (the pipeline's 0.5)
    max_detections: int = Field(100, gt=0)      # boxes per image scored by COCO mAP (its maxDets 100)


class DetectionRecipe(Recipe):
    task_class: ClassVar[str] = "tunesmith.tasks.detection:Detection"
    metrics: ClassVar[dict[str, Literal["max", "min"]]] = {**{k: "max" for k in STATS}, "loss": "min"}
    default_metric: ClassVar[str] = "map"
    # DETR's own fine-tuning rate (1e-4); the new class head alone learns faster
    learning_rates: ClassVar[dict[str, float]] = {"full": 1e-4, "lora": 2e-4, "head": 1e-3}
    # starter_model None: no detector weights ship offline (shared/ASSETS.md); users give a hub id
    # (PekingU/rtdetr_r18vd, facebook/detr-resnet-50, hustvl/yolos-tiny) or a folder

    task: Literal["object-detection"]
    data: DetectionData
    eval: DetectionEval = DetectionEval()
    augment: BoxAugment = BoxAugment()         # tasks/box_augment_schema.py (torch-free)

    @classmethod
    def sniff(cls, profile) -> Guess | None:
        """A COCO instances file (.json: images, annotations, categories) or a YOLO data.yaml (names and a train
        folder). Folders of YOLO or VOC labels are no image folder `init` profiles: give them as data.train by
        hand. Counts only: tasks/box_readers.py checks the boxes (it reaches torch through tunesmith.data)."""
        import json

        import yaml

        try:
            if profile.suffix == ".json":
                doc = json.loads(profile.path.read_text(encoding="utf-8"))
                if not (isinstance(doc, dict) and all(isinstance(doc.get(k), list)
                                                      for k in ("images", "annotations", "categories"))):
                    return None
                names = {c.get("id"): c.get("name") for c in doc["categories"] if isinstance(c, dict)}
                boxes = Counter(names.get(a.get("category_id"), "?") for a in doc["annotations"] if isinstance(a, dict))
                about = [f"COCO labels: {len(doc['images']):,} images, {sum(boxes.values()):,} boxes",
                         "boxes per class: " + ", ".join(f"{c} {n:,}" for c, n in boxes.most_common())]
                return Guess(0.95, {"format": "coco"}, about, NOTES)
            if profile.suffix in (".yaml", ".yml"):
                doc = yaml.safe_load(profile.path.read_text(encoding="utf-8"))
                if not (isinstance(doc, dict) and isinstance(doc.get("names"), (list, dict)) and "train" in doc):
                    return None
                names = doc["names"] if isinstance(doc["names"], list) else list(doc["names"].values())
                about = [f"YOLO data.yaml: {len(names)} classes ({', '.join(map(str, names[:10]))}); splits: "
                         f"{', '.join(k for k in ('train', 'val', 'test') if doc.get(k))}"]
                return Guess(0.95, {"format": "yolo"}, about, NOTES)
        except (OSError, ValueError, yaml.YAMLError):
            return None
        return None


NOTES = ["small data trains better with box-aware augmentation, e.g. augment: {hflip: 0.5}",
         "`tunesmith doctor` lists every unusable box with its file and line or annotation id"]


# --- COCO scores ---------------------------------------------------------------------------------------------

def coco_files(images: list[dict], truth: list[list[tuple]], found: list[list[tuple]], names: list[str]):
    """(ground truth, detections) as COCO dicts: images [{width, height}] in order (ids from 1), per image its true
    (box, class id) and detected (box, class id, score) pairs, boxes xyxy pixels; category ids are class id + 1."""
    gt = {"images": [{"id": i + 1, "width": im["width"], "height": im["height"]} for i, im in enumerate(images)],
          "categories": [{"id": c + 1, "name": n} for c, n in enumerate(names)], "annotations": []}
    dets = []
    for i, (boxes, hits) in enumerate(zip(truth, found)):
        for box, c in boxes:
            w, h = box[2] - box[0], box[3] - box[1]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": c + 1,
                                      "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        dets += [{"image_id": i + 1, "category_id": c + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                  "score": s} for b, c, s in hits]
    return gt, dets


def coco_scores(gt: dict, dets: list[dict], names: list[str], max_detections: int = 100) -> dict:
    """COCO box scores (STATS, -1 where undefined: no true boxes of that size), per-class AP@[.5:.95] and AP@.5,
    and pr_curves {recall: [101 points], classes: {name: {iou_50, iou_50_95: [precision per recall point, -1 where
    undefined]}}} (COCOeval's precision[T, R, K, area all, maxDets last]; iou_50_95: the mean over T), by
    faster-coco-eval's COCOeval (the `detection` extra), with COCO's own settings."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        from tunesmith.errors import TunesmithError
        raise TunesmithError("object detection's COCO mAP needs faster-coco-eval: pip install "
                             "'tunesmith[detection]'") from None
    import numpy as np

    if not gt["annotations"]:
        return {k: -1.0 for k in STATS} | {"per_class": {}, "n_images": len(gt["images"]), "n_boxes": 0,
                                          "pr_curves": {"recall": [], "classes": {}}}
    truth = COCO(gt)
    ev = COCOeval_faster(truth, truth.loadRes(dets), "bbox", print_function=lambda *a, **k: None)
    ev.params.maxDets = [1, 10, max_detections]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    out = {k: float(v) for k, v in zip(STATS, ev.stats)}
    precision = np.asarray(ev.eval["precision"])              # [IoU thresholds, recall points, classes, areas, maxDets]
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p, p50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
        per_class[names[cat - 1]] = {"ap": float(p[p > -1].mean()) if (p > -1).any() else -1.0,
                                     "ap_50": float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0}
    recall = [float(r) for r in ev.params.recThrs]
    curves = {"recall": recall, "classes": {}}                 # precision at each recall point, -1 where undefined
    for k, cat in enumerate(ev.params.catIds):
        curves["classes"][names[cat - 1]] = {
            "iou_50": [round(float(v), 6) for v in precision[0, :, k, 0, -1]],
            "iou_50_95": [round(float(v), 6) if v > -1 else -1.0 for v in _mean_defined(precision[:, :, k, 0, -1])]}
    return out | {"per_class": per_class, "n_images": len(gt["images"]), "n_boxes": len(gt["annotations"]),
                  "pr_curves": curves}


def _mean_defined(p):
    """[IoU thresholds, recall points] -> per recall point the mean over the thresholds where defined, else -1."""
    import numpy as np

    ok = p > -1
    return np.where(ok.any(0), np.where(ok, p, 0).sum(0) / np.maximum(ok.sum(0), 1), -1.0)
