"""Box-aware augmentation for object detection: kornia moves the pixels, the boxes follow them.

augment_boxes(images, boxes, labels, settings, generator) -> (images, boxes, labels, dropped)
  images    [B, 3, H, W] float in [0, 1]; the output has the same shape (a crop is resized back to H x W)
  boxes     one [n, 4] float tensor per image, xyxy in pixels with exclusive ends: a box over pixel columns
            2..7 is x0 = 2, x1 = 8 (COCO's x, x + w)
  labels    one [n] long tensor per image, kept in step with its boxes
  settings  a BoxAugment (tunesmith/tasks/box_augment_schema.py)
  generator a torch.Generator: the only source of randomness. One int64 is drawn from it per call and seeds
            kornia inside torch.random.fork_rng, so the global RNG is left as it was, and the same generator
            state gives the same output (exact resume restores the generator, nothing else)
  dropped   boxes removed because the augmentation left too little of them inside the image

Coordinates: kornia treats a box corner as a pixel centre (its "xyxy_plus" form; a flip maps x to W - 1 - x);
ours are pixel edges. The boxes go in shifted by -0.5 and come back shifted by +0.5, which makes every affine
step exact for edges (a flip maps x0, x1 to W - x1, W - x0). Moved boxes are clipped to the image; one keeping
less than `min_visible` of its moved area, or nothing, is dropped.

Mosaic is not offered: kornia's RandomMosaic refuses a label key, and four images per sample would change the
batch's composition under the loop's sampler (exact resume). Vertical flips and rotations are left out too: the
first changes what "up" means for most scenes, the second turns boxes into larger axis-aligned hulls.
"""
from __future__ import annotations

import torch

from tunesmith.errors import TunesmithError
from tunesmith.tasks.box_augment_schema import BoxAugment

_PIPELINES: dict[tuple[str, int, int], object] = {}     # (settings JSON, H, W) -> kornia AugmentationSequential


def _pipeline(settings: BoxAugment, height: int, width: int):
    """The kornia AugmentationSequential for `settings` at one image size, or None when no step is on."""
    key = (settings.model_dump_json(), height, width)
    if key not in _PIPELINES:
        try:
            import kornia.augmentation as K
        except ImportError:
            raise TunesmithError("box augmentation needs kornia: pip install 'tunesmith[detection]' "
                                 "(or: pip install kornia)") from None

        steps = []          # the zoom before the crop: kornia 0.9 moves boxes off their pixels (by up to 6 px on
        if settings.scale:  # 64 x 48 images) for an affine step after a resized crop; this order is exact
            steps.append(K.RandomAffine(degrees=0.0, scale=settings.scale, p=1.0))
        if settings.crop_scale:
            steps.append(K.RandomResizedCrop((height, width), scale=settings.crop_scale, ratio=settings.crop_ratio,
                                             p=1.0))
        if settings.hflip:
            steps.append(K.RandomHorizontalFlip(p=settings.hflip))
        if settings.brightness or settings.contrast or settings.saturation or settings.hue:
            steps.append(K.ColorJitter(settings.brightness, settings.contrast, settings.saturation, settings.hue,
                                       p=1.0))
        _PIPELINES[key] = K.AugmentationSequential(*steps, data_keys=["input", "bbox_xyxy"]) if steps else None
    return _PIPELINES[key]


def augment_boxes(images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                  settings: BoxAugment, generator: torch.Generator
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], int]:
    """One random augmentation per image (see the module docstring); (images, boxes, labels, dropped)."""
    if images.dim() != 4 or len(boxes) != len(images) or len(labels) != len(images):
        raise ValueError(f"augment_boxes takes [B, 3, H, W] images with one boxes and one labels tensor each "
                         f"(got {tuple(images.shape)}, {len(boxes)} boxes, {len(labels)} labels)")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))     # drawn even when nothing is on: one
    height, width = images.shape[-2:]                                    # draw per call keeps the stream aligned
    aug = _pipeline(settings, height, width)
    if aug is None:
        return images, boxes, labels, 0
    shifted = [b.to(images.dtype).reshape(-1, 4) - 0.5 for b in boxes]     # pixel edges -> kornia's pixel centres
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out_images, moved = aug(images, shifted)
    kept_boxes, kept_labels, dropped = [], [], 0
    for b, y in zip(moved, labels):
        keep, b = clip_boxes(b + 0.5, width, height, settings.min_visible)
        dropped += int((~keep).sum())
        kept_boxes.append(b[keep])
        kept_labels.append(y[keep.to(y.device)])
    return out_images.clamp(0, 1), kept_boxes, kept_labels, dropped


def clip_boxes(boxes: torch.Tensor, width: int, height: int, min_visible: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep mask [n] bool, boxes clipped to the image [n, 4]): a box is kept when its clipped area is positive and
    at least `min_visible` of its unclipped area (corners in any order are sorted first)."""
    boxes = boxes.reshape(-1, 4)
    x0, x1 = torch.minimum(boxes[:, 0], boxes[:, 2]), torch.maximum(boxes[:, 0], boxes[:, 2])
    y0, y1 = torch.minimum(boxes[:, 1], boxes[:, 3]), torch.maximum(boxes[:, 1], boxes[:, 3])
    area = (x1 - x0) * (y1 - y0)
    clipped = torch.stack([x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)], 1)
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (inside > 0) & (inside >= min_visible * area)
    return keep, clipped
