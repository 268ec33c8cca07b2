"""Tiny detectors built from configs, and generated images with known boxes (coloured rectangles on noise) written
as COCO JSON, YOLO txt (+ data.yaml) and Pascal VOC XML."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

NAMES = ["red", "blue"]
COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230)}


def scene(rng: random.Random, width: int, height: int, count: int) -> tuple[np.ndarray, list, list]:
    """(pixels [H, W, 3] uint8: grey noise with `count` filled rectangles, boxes xyxy integer pixels, labels)."""
    gen = np.random.default_rng(rng.randrange(2**32))
    pixels = gen.integers(90, 150, (height, width, 3), dtype=np.uint8)
    boxes, labels = [], []
    for _ in range(count):
        w, h = rng.randint(width // 4, width // 2), rng.randint(height // 4, height // 2)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        label = rng.choice(NAMES)
        pixels[y:y + h, x:x + w] = COLOURS[label]
        boxes.append([x, y, x + w, y + h])
        labels.append(label)
    return pixels, boxes, labels


def images(folder: Path, n: int = 8, seed: int = 0, size=(64, 48), count: int = 1) -> list[dict]:
    """n PNG images in `folder` with their truth: [{file, width, height, boxes, labels}]; the last one has no box
    when n > 4 (a negative)."""
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        pixels, boxes, labels = scene(rng, *size, 0 if n > 4 and i == n - 1 else count)
        file = folder / f"img{i:03d}.png"
        Image.fromarray(pixels).save(file)
        out.append({"file": file, "width": size[0], "height": size[1], "boxes": boxes, "labels": labels})
    return out


def write_coco(path: Path, truth: list[dict], extra: list[dict] = ()) -> Path:
    doc = {"images": [{"id": i + 1, "file_name": str(t["file"].relative_to(path.parent)), "width": t["width"],
                       "height": t["height"]} for i, t in enumerate(truth)],
           "categories": [{"id": c + 1, "name": n} for c, n in enumerate(NAMES)], "annotations": []}
    for i, t in enumerate(truth):
        for b, label in zip(t["boxes"], t["labels"]):
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": i + 1,
                                       "category_id": NAMES.index(label) + 1, "iscrowd": 0,
                                       "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    doc["annotations"] += list(extra)
    path.write_text(json.dumps(doc))
    return path


def write_yolo(root: Path, truth: list[dict]) -> Path:
    """root/images/*.png (copied), root/labels/*.txt, root/data.yaml; returns root/data.yaml."""
    import shutil

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    for t in truth:
        shutil.copy(t["file"], root / "images" / t["file"].name)
        W, H = t["width"], t["height"]
        lines = [f"{NAMES.index(c)} {(b[0] + b[2]) / 2 / W:.6f} {(b[1] + b[3]) / 2 / H:.6f} {(b[2] - b[0]) / W:.6f} "
                 f"{(b[3] - b[1]) / H:.6f}" for b, c in zip(t["boxes"], t["labels"])]
        if lines:                                   # a negative has no label file
            (root / "labels" / (t["file"].stem + ".txt")).write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images\nval: images\nnames: {json.dumps(NAMES)}\n")
    return root / "data.yaml"


def write_voc(root: Path, truth: list[dict]) -> Path:
    """root/Annotations/*.xml, root/JPEGImages/*.png; returns root/Annotations."""
    import shutil

    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    for t in truth:
        shutil.copy(t["file"], root / "JPEGImages" / t["file"].name)
        objects = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                          f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                          for b, c in zip(t["boxes"], t["labels"]))
        (root / "Annotations" / (t["file"].stem + ".xml")).write_text(
            f"<annotation><filename>{t['file'].name}</filename><size><width>{t['width']}</width><height>"
            f"{t['height']}</height><depth>3</depth></size>{objects}</annotation>")
    return root / "Annotations"


def tiny_detector(folder: Path, kind: str = "detr", side: int = 64) -> Path:
    """A tiny detector of `kind` (detr, conditional_detr, rt_detr, yolos) with random weights and its PIL image
    processor (longest side `side`), saved as an HF folder; two classes."""
    import torch
    from transformers import (
        AutoModelForObjectDetection,
        ConditionalDetrConfig,
        ConditionalDetrImageProcessorPil,
        DetrConfig,
        DetrImageProcessorPil,
        ResNetConfig,
        RTDetrConfig,
        RTDetrImageProcessorPil,
        RTDetrResNetConfig,
        YolosConfig,
        YolosImageProcessorPil,
    )

    labels = {"id2label": dict(enumerate(NAMES)), "label2id": {n: i for i, n in enumerate(NAMES)}}
    resnet = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1],
                          out_features=["stage4"])
    heads = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, use_timm_backbone=False,
                 use_pretrained_backbone=False, backbone_config=resnet, **labels)
    edge = {"shortest_edge": side, "longest_edge": side}
    if kind == "detr":
        config, processor = DetrConfig(**heads), DetrImageProcessorPil(size=edge)
    elif kind == "conditional_detr":
        config, processor = ConditionalDetrConfig(**heads), ConditionalDetrImageProcessorPil(size=edge)
    elif kind == "yolos":
        config = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=[side, side], patch_size=8, num_detection_tokens=10, **labels)
        processor = YolosImageProcessorPil(size=edge)
    elif kind == "rt_detr":
        backbone = RTDetrResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1],
                                      out_features=["stage2", "stage3", "stage4"])
        config = RTDetrConfig(backbone_config=backbone, encoder_in_channels=[32, 32, 32], d_model=32,
                              encoder_hidden_dim=32, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_layers=1,
                              encoder_layers=1, num_queries=10, decoder_in_channels=[32, 32, 32],
                              use_pretrained_backbone=False, **labels)
        processor = RTDetrImageProcessorPil(size={"height": side, "width": side})
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    AutoModelForObjectDetection.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
