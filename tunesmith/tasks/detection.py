"""Object detection on transformers' AutoModelForObjectDetection (DETR, Conditional DETR, Deformable DETR, RT-DETR,
YOLOS; hub id or folder) from COCO JSON, YOLO txt or Pascal VOC XML labels (tasks/box_readers.py).

Rows: one image each, {image, width, height, boxes (xyxy pixels), labels (class names), where (provenance per
box)}; boxes the reader could not use are rejects (data.bad_rows decides: error stops, skip trains without them)
with their file and line or object id, the same list the doctor's box checks read (self.rejected).

Preprocessing is the model's own image processor (PIL backend, no torchvision): encode resizes each image once
(data.image_size, saved with the model) to uint8 pixels and scales its boxes alike; collate pads a batch (with a
pixel mask where the model takes one), normalises, and gives labels as the processor would: class ids and cxcywh
boxes normalised to the padded image. The loss is the model's own `.loss` (Hungarian matching). Detections are the
processor's post_process_object_detection, so predict equals pipeline("object-detection", model=RUN/model).
Scores: COCO mAP by faster-coco-eval (detection_schema.coco_scores); eval.json's inputs are written beside it.

Declares: prediction "boxes", ONNX outputs (logits, pred_boxes), balance_unit "boxes", rows "images" with parts "boxes"
(a rejected box is counted apart from images); no chat, explain or distil.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from tunesmith import io, vision
from tunesmith.data import DataError, Reject, Table
from tunesmith.errors import TunesmithError
from tunesmith.tasks import box_readers
from tunesmith.tasks.base import Features, Task, model_device
from tunesmith.tasks.detection_schema import coco_files, coco_scores
from tunesmith.tasks.hf import load_hf, load_image_processor, load_saved

SAMPLES = 20                    # test images evaluate_final writes to samples.jsonl (the report's)
THUMB = 8                       # embed(): images as THUMB x THUMB colour thumbnails (near-duplicate search)


def augment(images, boxes, labels, settings, generator):
    """The box-aware augmentation (tunesmith/tasks/box_augment.py, kornia) where it is installed, else identity:
    (images [B, 3, H, W] in [0, 1], boxes [n, 4] xyxy pixels per image, labels [n] per image, dropped boxes)."""
    try:
        from tunesmith.tasks.box_augment import augment_boxes
    except ImportError:
        return images, boxes, labels, 0
    return augment_boxes(images, boxes, labels, settings, generator)


class Detection(Task):
    name = "object-detection"
    input_key = "image"
    near_method = "embedding"       # Task.key is a pixel hash: near duplicates compare image thumbnails
    prediction = "boxes"            # predict: {"boxes": [{box, label, score}]}
    balance_unit = "boxes"          # the doctor's class balance counts boxes per class
    row_unit, part_unit = "images", "boxes"     # a rejected box is a part of its image: counted apart
    names: list[str] = []

    def __init__(self, recipe, pad_multiple: int = 1):
        super().__init__(recipe, pad_multiple)
        self.rejected: dict[str, list[tuple[str, str]]] = {}   # split -> (where, reason) of unusable boxes
        self.data_names: list[str] | None = None              # class names the train labels declare
        self.negatives_left: dict[str, int] = {}               # split -> images without boxes left out
        self._takes_mask: bool | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.names)

    @property
    def path_columns(self) -> tuple[str, ...]:
        return ("image",)

    def set_labels(self, names: list[str]) -> None:
        self.names = list(names)
        self.label2id = {n: i for i, n in enumerate(self.names)}

    # --- data ---------------------------------------------------------------------------------------
    def read(self, source: str, split: str):
        """COCO, YOLO or VOC labels (data.format, or detected) as a data.Table; unusable boxes are its rejects.
        None: another format (JSONL rows of the row format, as a run's data/test.jsonl), the shared readers'."""
        cfg = self.recipe.data
        form = cfg.format if cfg.format != "auto" else box_readers.detect(source)
        if form is None or Path(source).suffix.lower() == ".jsonl":
            return None
        got = box_readers.read(source, split, form, cfg.images, cfg.names)
        if split == "train":
            self.data_names = cfg.names or got.names
        rows, origins = got.rows, got.origins
        if not cfg.negatives:
            keep = [i for i, r in enumerate(rows) if r["boxes"]]
            self.negatives_left[split] = len(rows) - len(keep)
            rows, origins = [rows[i] for i in keep], [origins[i] for i in keep]
        self.rejected[split] = list(got.rejected)
        return Table(rows, origins, [Reject(w, why, split) for w, why in got.rejected], source)

    def check(self, row: dict, split: str) -> str | None:
        reason = self.check_input(row)
        if reason:
            return reason
        w, h, boxes, labels = row.get("width"), row.get("height"), row.get("boxes"), row.get("labels")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            return "width and height must be positive integers (pixels)"
        if not (isinstance(boxes, list) and isinstance(labels, list) and len(boxes) == len(labels)):
            return "boxes and labels must be lists of the same length"
        known = self.names or self.recipe.data.names        # train's classes once learned, else data.names
        for box, label in zip(boxes, labels):
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                return f"box {box!r} is not [x0, y0, x1, y1] numbers"
            problem = box_readers.box_problem(box, w, h)
            if problem:
                return problem
            if known and label not in known:
                return f"class {label!r} is not among the classes ({', '.join(known)}; data.names or train's)"
        return None

    def check_input(self, item) -> str | None:
        value = item.get("image") if isinstance(item, dict) else item
        if value in (None, ""):
            return "missing image (column 'image')"
        return vision.check_image(value)

    def check_notes(self) -> list[str]:
        return [f"{split}: {n:,} image(s) without boxes left out (data.negatives: false)"
                for split, n in self.negatives_left.items() if n]

    def key(self, row: dict) -> str:
        return vision.image_key(row["image"])

    def parts(self, row: dict) -> int:
        boxes = row.get("boxes")
        return len(boxes) if isinstance(boxes, list) else 0

    def balance_labels(self, row: dict) -> list[str]:
        return list(row.get("labels") or [])

    def prepare(self, rows: list[dict]) -> None:
        names = self.data_names or sorted({c for r in rows for c in r["labels"]})
        if not names:
            raise DataError(f"{self.recipe.data.train}: no boxes in the usable train rows")
        self.set_labels(names)

    def data_findings(self, tables: dict) -> tuple[dict, list[str], list[str]]:
        """The doctor's box checks (tunesmith/diagnosis/boxes.py) on the usable rows and the rejected boxes: the
        same (where, reason) list training stops on or skips (what the shared doctor already says, box_findings
        keeps to doctor.json's task section: each finding is said once)."""
        rejected = [pair for items in self.rejected.values() for pair in items]        # (where, reason)
        try:
            from tunesmith.diagnosis.boxes import box_findings
        except ImportError:
            return {"rejected_boxes": [{"where": w, "reason": why} for w, why in rejected]}, [], []
        section, warnings, blocking = box_findings({s: t.rows for s, t in tables.items()}, self.names, rejected,
                                                   listed=self.recipe.doctor.listed, bad_rows=self.recipe.data.bad_rows)
        return section, warnings, blocking

    def findings_lines(self, section: dict, listed: int) -> list[str]:
        if "splits" not in section:                   # data_findings without the box checks (see above)
            return [f"rejected box {x['where']}: {x['reason']}" for x in section.get("rejected_boxes", [])[:listed]]
        from tunesmith.diagnosis.boxes import box_lines

        return box_lines(section, listed)

    def encode(self, rows: list[dict]) -> Features:
        """Per row: uint8 pixels [3, h, w] as the processor resizes them, size (height, width) of the original;
        labelled rows also: boxes [n, 4] xyxy in the resized pixels, classes [n], truth (xyxy original pixels)."""
        out = Features()
        for r in rows:
            try:
                image = vision.load_image(r["image"])
            except Exception as e:                  # check() decoded it: the file changed since
                raise TunesmithError(f"image became unreadable after the data check: {e}") from None
            got = self.processor(image, do_rescale=False, do_normalize=False, do_pad=False, return_tensors=None)
            pixels = torch.as_tensor(got["pixel_values"][0]).round().clamp(0, 255).to(torch.uint8)
            f = {"pixels": pixels, "size": (image.height, image.width)}
            if "boxes" in r:
                sx, sy = pixels.shape[2] / image.width, pixels.shape[1] / image.height
                truth = torch.tensor(r["boxes"], dtype=torch.float32).reshape(-1, 4)
                f |= {"truth": truth, "boxes": truth * torch.tensor([sx, sy, sx, sy]),
                      "classes": torch.tensor([self.label2id[c] for c in r["labels"]], dtype=torch.long)}
            out.append(f)
        return out

    def length(self, feature: dict) -> int:
        return 1                                        # batches keep their order (padding is per batch)

    def takes_mask(self, model=None) -> bool:
        """Whether the model's forward takes a pixel mask (DETR-family yes, YOLOS no)."""
        if self._takes_mask is None and model is not None:
            self._takes_mask = "pixel_mask" in inspect.signature(model.forward).parameters
        return bool(self._takes_mask)

    def collate(self, features: list[dict]) -> dict:
        # pixel_values [B, 3, H, W] (padded at the bottom and right with 0 after normalising, as the processor
        # does), pixel_mask [B, H, W] 1 on real pixels; labels: per image {class_labels [n], boxes [n, 4] cxcywh
        # relative to the padded image}
        H = max(f["pixels"].shape[1] for f in features)
        W = max(f["pixels"].shape[2] for f in features)
        scale, shift = vision.normalization(self.processor)
        pixels = torch.zeros((len(features), 3, H, W))
        mask = torch.zeros((len(features), H, W), dtype=torch.long)
        for i, f in enumerate(features):
            _, h, w = f["pixels"].shape
            pixels[i, :, :h, :w] = f["pixels"].float() * scale + shift
            mask[i, :h, :w] = 1
        batch = {"pixel_values": pixels}
        if self.takes_mask():
            batch["pixel_mask"] = mask
        if "boxes" in features[0]:
            batch["labels"] = [target(f["boxes"], f["classes"], W, H) for f in features]
        return batch

    # --- model --------------------------------------------------------------------------------------
    def load_processor(self, source, revision):
        return load_image_processor(source, revision, self.trust_remote_code,
                                    "DetrImageProcessorPil(size=...).save_pretrained(path)")

    def setup(self, source=None) -> None:
        super().setup(source)
        side = self.recipe.data.image_size
        if source is None and side:                 # training: the recipe's size (saved with the model)
            size = vision._fields(self._processor.size)
            self._processor.size = {"height": side, "width": side} if "height" in size else \
                {"shortest_edge": side, "longest_edge": side}

    def load_model(self):
        from transformers import AutoModelForObjectDetection

        model, _ = load_hf(AutoModelForObjectDetection, self.recipe.model, id2label=dict(enumerate(self.names)),
                           label2id=dict(self.label2id))
        self.takes_mask(model)
        return model

    def load_trained(self, folder):
        from transformers import AutoModelForObjectDetection

        model = load_saved(self, AutoModelForObjectDetection, folder)
        self.set_labels([model.config.id2label[i] for i in range(len(model.config.id2label))])
        self.takes_mask(model)
        return model

    # --- training and evaluation --------------------------------------------------------------------
    def loss(self, model, batch: dict) -> torch.Tensor:
        aug = self.recipe.augment
        if aug.enabled:
            batch = self.augmented(batch, aug)
        return model(**batch).loss * self.count(batch)

    def augmented(self, batch: dict, aug) -> dict:
        """The batch through `augment`, with a generator drawn from the global RNG (a checkpoint restores it)."""
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        pv = batch["pixel_values"]
        _, _, H, W = pv.shape
        scale, shift = (t.to(pv) for t in vision.normalization(self.processor))
        x = ((pv - shift) / scale / 255).clamp(0, 1)
        size = torch.tensor([W, H, W, H], dtype=torch.float32)
        boxes = [corners(t["boxes"].cpu()) * size for t in batch["labels"]]
        classes = [t["class_labels"].cpu() for t in batch["labels"]]
        x, boxes, classes, _ = augment(x, boxes, classes, aug, g)
        _, _, h, w = x.shape                        # a resizing augmentation may change the batch's size
        labels = [target(b, c, w, h) for b, c in zip(boxes, classes)]
        out = {**batch, "pixel_values": x * 255 * scale + shift,
               "labels": [{k: v.to(pv.device) for k, v in t.items()} for t in labels]}
        if "pixel_mask" in batch and (h, w) != (H, W):
            out["pixel_mask"] = torch.ones((len(x), h, w), dtype=batch["pixel_mask"].dtype, device=pv.device)
        return out

    def detect(self, model, features: list[dict], batch_size: int, threshold: float, top: int):
        """(mean loss or None, per feature its detections [(xyxy original pixels, class id, score)], most
        confident first, at most `top`)."""
        out, losses, device = [None] * len(features), [], model_device(model)
        for s in range(0, len(features), batch_size):
            chunk = features[s:s + batch_size]
            batch = {k: (v.to(device) if torch.is_tensor(v) else [{a: b.to(device) for a, b in t.items()} for t in v])
                     for k, v in self.collate(chunk).items()}
            result = model(**batch)
            if "labels" in batch and getattr(result, "loss", None) is not None:      # an ONNX model has no loss
                losses.append((float(result.loss), len(chunk)))
            _, _, H, W = batch["pixel_values"].shape
            found = self.processor.post_process_object_detection(result, threshold=threshold,
                                                                 target_sizes=[(H, W)] * len(chunk))
            for i, (f, d) in enumerate(zip(chunk, found)):
                _, h, w = f["pixels"].shape
                back = torch.tensor([f["size"][1] / w, f["size"][0] / h] * 2)
                scores, classes, boxes = d["scores"].float().cpu(), d["labels"].cpu(), d["boxes"].float().cpu()
                order = scores.argsort(descending=True, stable=True)[:top]
                out[s + i] = [(b, int(c), min(max(float(p), 0.0), 1.0)) for b, c, p in
                              zip((boxes[order] * back).tolist(), classes[order].tolist(), scores[order].tolist())]
        loss = sum(a * n for a, n in losses) / sum(n for _, n in losses) if losses else None
        return loss, out

    def evaluate(self, model, features: list[dict], batch_size: int) -> dict:
        result, _ = self.scored(model, features, batch_size)
        return result

    def scored(self, model, features, batch_size):
        loss, found = self.detect(model, features, batch_size, 0.0, self.recipe.eval.max_detections)
        images = [{"width": f["size"][1], "height": f["size"][0]} for f in features]
        truth = [list(zip(f["truth"].tolist(), f["classes"].tolist())) for f in features]
        gt, dets = coco_files(images, truth, found, self.names)
        result = coco_scores(gt, dets, self.names, self.recipe.eval.max_detections)
        curves = result.pop("pr_curves")                    # evaluate_final's pr_curves.json, not a metric
        return ({**result, **({"loss": loss} if loss is not None else {})}, (gt, dets, found, curves))

    def evaluate_final(self, model, rows, features, batch_size, out_dir=None) -> dict:
        """evaluate(); out_dir: also coco_truth.json and coco_detections.json (what the scores were computed from:
        pycocotools or faster-coco-eval on them gives eval.json's numbers), pr_curves.json (per-class precision-recall
        curves, detection_schema.coco_scores) and samples.jsonl (true and found boxes of up to SAMPLES test
        images): the report's."""
        result, (gt, dets, found, curves) = self.scored(model, features, batch_size)
        if out_dir is not None:
            io.write_json(Path(out_dir) / "coco_truth.json", gt)
            io.write_json(Path(out_dir) / "coco_detections.json", dets)
            io.write_json(Path(out_dir) / "pr_curves.json", curves)
            threshold = self.recipe.eval.score_threshold
            io.write_jsonl(Path(out_dir) / "samples.jsonl", [
                {"input": vision.describe(r["image"]), "image": r["image"],
                 "reference": {"boxes": [{"box": b, "label": c, "score": 1.0}
                                         for b, c in zip(r["boxes"], r["labels"])]},
                 "output": self.boxes([d for d in hits if d[2] > threshold])}
                for r, hits in list(zip(rows, found))[:SAMPLES]])
        return result

    def loggable(self, metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def boxes(self, found) -> dict:
        return {"boxes": [{"box": [round(v, 2) for v in b], "label": self.names[c], "score": round(p, 6)}
                          for b, c, p in found]}

    def embed(self, model, features: list[dict], batch_size: int):
        """THUMB x THUMB colour thumbnails of the images, unit length (near-duplicate images across splits)."""
        import numpy as np
        import torch.nn.functional as F

        thumbs = torch.stack([F.adaptive_avg_pool2d(f["pixels"].float()[None], THUMB)[0].flatten() for f in features])
        thumbs = thumbs - thumbs.mean(1, keepdim=True)
        return F.normalize(thumbs, dim=1).numpy().astype(np.float32)

    def predict(self, model, inputs: list) -> list[dict]:
        """Boxes above eval.score_threshold, most confident first. Images of one resized shape share a batch (no
        padding), so each image's boxes are those of pipeline("object-detection") on it alone."""
        rows = [{"image": x["image"] if isinstance(x, dict) else x} for x in inputs]
        for r in rows:
            reason = vision.check_image(r["image"])
            if reason:
                raise TunesmithError(reason)
        features = self.encode(rows)
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(features):
            groups.setdefault(tuple(f["pixels"].shape), []).append(i)
        out = [None] * len(rows)
        with torch.no_grad():
            for idx in groups.values():
                _, found = self.detect(model, [features[i] for i in idx], self.recipe.eval.batch_size,
                                       self.recipe.eval.score_threshold, self.recipe.eval.max_detections)
                for i, hits in zip(idx, found):
                    out[i] = self.boxes(hits)
        return out

    # --- ONNX export ---------------------------------------------------------------------------------
    def export_outputs(self) -> dict[str, dict[int, str]]:
        return {"logits": {0: "batch"}, "pred_boxes": {0: "batch"}}            # [B, Q, C + 1], [B, Q, 4]

    def export_inputs(self) -> dict[str, tuple[torch.Tensor, dict[int, str]]]:
        side = max(vision._fields(self.processor.size).values())
        pixels = torch.zeros((2, 3, side, side), dtype=torch.uint8)
        batch = self.collate([{"pixels": p} for p in pixels])
        axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "pixel_mask": {0: "batch", 1: "height",
                                                                                      2: "width"}}
        return {k: (v, axes[k]) for k, v in batch.items()}


def corners(cxcywh: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def target(boxes: torch.Tensor, classes: torch.Tensor, W: int, H: int) -> dict:
    """The model's label for one image: xyxy pixel boxes as cxcywh relative to the (padded) W x H batch image."""
    b = boxes.float().reshape(-1, 4)
    cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / W, (b[:, 1] + b[:, 3]) / 2 / H, (b[:, 2] - b[:, 0]) / W,
                          (b[:, 3] - b[:, 1]) / H], -1)
    return {"class_labels": classes.long(), "boxes": cxcywh}
