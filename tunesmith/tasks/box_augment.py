"""Box-aware augmentation for object detection: kornia moves the pixels, the boxes follow them.

augment_boxes(images, boxes, labels, settings, generator) -> (images, boxes, labels, dropped)
  images    [B, 3, H, W] float in [0, 1]; the output has the same shape (a crop is resized back to H x W)
  boxes     one [n, 4] float tensor per image, xyxy in pixels with exclusive ends: a box over pixel columns
            2..7 is x0 = 2, x1 = 8 (COCO's x, x + w)
  labels    one [n] long tensor per image, kept in step with its boxes
  settings  a BoxAugment (tunesmith/tasks/box_augment_schema.py)
  generator a torch.Generator: the only source of randomness. One int64 is drawn from it per call (whatever the
            settings); it seeds the mosaic's draws and kornia inside torch.random.fork_rng, so the global RNG is
            left as it was, and the same generator state gives the same output (exact resume restores the
            generator, nothing else)
  dropped   boxes removed because the augmentation left too little of them inside the image

Coordinates: kornia treats a box corner as a pixel centre (its "xyxy_plus" form; a flip maps x to W - 1 - x);
ours are pixel edges. The boxes go in shifted by -0.5 and come back shifted by +0.5, which makes every affine
step exact for edges (a flip maps x0, x1 to W - x1, W - x0). Moved boxes are clipped to the image; one keeping
less than `min_visible` of its moved area, or nothing, is dropped.

Order: mosaic, zoom, resized crop, flips, colour. The mosaic is done here, not by kornia (its RandomMosaic refuses a
label key): an image picked with probability `mosaic` becomes a 2 x 2 grid of itself and three other images of the
batch, each resized to its quarter (boxes scaled and offset: exact for edges), so the batch keeps its size and the
loop's sampler is untouched. Rotations are not offered: they turn boxes into larger axis-aligned hulls.
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
        if settings.vflip:
            steps.append(K.RandomVerticalFlip(p=settings.vflip))
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
    if settings.mosaic:
        images, boxes, labels = mosaic(images, boxes, labels, settings.mosaic, torch.Generator().manual_seed(seed))
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


def mosaic(images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor], p: float,
           generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Each image, with probability p, replaced by a 2 x 2 grid: itself top left, three other images of the batch
    (drawn with repetition) in the other quarters, each resized to its quarter; boxes scaled and moved with them."""
    import torch.nn.functional as F

    n, _, height, width = images.shape
    picked = (torch.rand(n, generator=generator) < p).tolist()
    others = torch.randint(0, n, (n, 3), generator=generator).tolist()
    if not any(picked):
        return images, boxes, labels
    h0, w0 = height // 2, width // 2
    quarters = [(0, 0, h0, w0), (0, w0, h0, width - w0), (h0, 0, height - h0, w0), (h0, w0, height - h0, width - w0)]
    out, out_boxes, out_labels = images.clone(), list(boxes), list(labels)
    for i in (i for i in range(n) if picked[i]):
        parts_b, parts_y = [], []
        for j, (y, x, h, w) in zip([i, *others[i]], quarters):
            out[i, :, y:y + h, x:x + w] = F.interpolate(images[j:j + 1], size=(h, w), mode="bilinear",
                                                        align_corners=False, antialias=True)[0]
            scale = torch.tensor([w / width, h / height, w / width, h / height], dtype=images.dtype)
            parts_b.append(boxes[j].to(images.dtype).reshape(-1, 4) * scale.to(boxes[j].device)
                           + torch.tensor([x, y, x, y], dtype=images.dtype, device=boxes[j].device))
            parts_y.append(labels[j])
        out_boxes[i], out_labels[i] = torch.cat(parts_b), torch.cat(parts_y)
    return out, out_boxes, out_labels


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
