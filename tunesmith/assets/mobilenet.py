"""The bundled ImageNet MobileNetV2 (torchvision key layout) as transformers' MobileNetV2ForImageClassification.

The two are the same network once transformers' MobileNetV2 uses PyTorch conventions: symmetric padding
(tf_padding=False), BatchNorm eps 1e-5, dropout 0.2 before the classifier, inputs resized to 256, center
cropped to 224 and normalized with ImageNet mean/std. Keys map one to one (314 tensors):
  features.0              -> conv_stem.first_conv              3x3 conv, stride 2
  features.1.conv.0       -> conv_stem.conv_3x3                depthwise (the first block does not expand)
  features.1.conv.1, .2   -> conv_stem.reduce_1x1              conv, BatchNorm
  features.i.conv.0       -> layer.(i-2).expand_1x1            i = 2..17
  features.i.conv.1       -> layer.(i-2).conv_3x3
  features.i.conv.2, .3   -> layer.(i-2).reduce_1x1            conv, BatchNorm
  features.18             -> conv_1x1
  classifier.1            -> classifier
where a `.0` / `.1` suffix inside a conv block is its convolution / BatchNorm (`normalization`).
Everything lands in a plain transformers folder, so `pipeline("image-classification", folder)` loads it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tunesmith import io

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]   # torchvision's normalization


def config(num_labels: int = 1000):
    from transformers import MobileNetV2Config

    return MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5, classifier_dropout_prob=0.2,
                             hidden_act="relu6", num_labels=num_labels, image_size=224)


def _conv_block(prefix: str, rest: str) -> str:
    """`0.weight` -> `<prefix>.convolution.weight`, `1.running_mean` -> `<prefix>.normalization.running_mean`."""
    index, _, leaf = rest.partition(".")
    return f"{prefix}.{'convolution' if index == '0' else 'normalization'}.{leaf}"


def map_key(key: str) -> str:
    """One torchvision MobileNetV2 key as the transformers key (see the module docstring)."""
    if key.startswith("classifier.1."):
        return "classifier." + key.removeprefix("classifier.1.")
    m = re.match(r"features\.(\d+)\.(.*)", key)
    if not m:
        raise KeyError(f"not a torchvision MobileNetV2 key: {key}")
    block, rest = int(m.group(1)), m.group(2)
    base = "mobilenet_v2"
    if block == 0:
        return _conv_block(f"{base}.conv_stem.first_conv", rest)
    if block == 18:
        return _conv_block(f"{base}.conv_1x1", rest)
    part, _, leaf = rest.removeprefix("conv.").partition(".")
    if block == 1:
        if part == "0":
            return _conv_block(f"{base}.conv_stem.conv_3x3", leaf)
        return f"{base}.conv_stem.reduce_1x1.{'convolution' if part == '1' else 'normalization'}.{leaf}"
    layer = f"{base}.layer.{block - 2}"
    if part in ("0", "1"):
        return _conv_block(f"{layer}.{'expand_1x1' if part == '0' else 'conv_3x3'}", leaf)
    return f"{layer}.reduce_1x1.{'convolution' if part == '2' else 'normalization'}.{leaf}"


def from_torchvision(state: dict[str, torch.Tensor]):
    """MobileNetV2ForImageClassification holding a torchvision-layout ImageNet state dict (strict: every key)."""
    from transformers import MobileNetV2ForImageClassification

    model = MobileNetV2ForImageClassification(config(num_labels=state["classifier.1.weight"].shape[0]))
    missing, unexpected = model.load_state_dict({map_key(k): v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise KeyError(f"MobileNetV2 mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def processor():
    """torchvision's ImageNet preprocessing as a transformers image processor (PIL backend, no torchvision)."""
    from transformers import MobileNetV2ImageProcessorPil

    return MobileNetV2ImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def convert(weights: Path, folder: Path) -> Path:
    """Write `weights` (a torchvision .pth state dict) as a transformers folder at `folder`, atomically."""
    folder = Path(folder)
    model = from_torchvision(torch.load(weights, map_location="cpu", weights_only=True))
    with io.atomic_folder(folder, keep_existing=True) as tmp:    # another process finished first: keep its copy
        model.save_pretrained(tmp)
        processor().save_pretrained(tmp)
    return folder
