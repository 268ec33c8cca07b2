"""Images: reading them from any source a row may hold, the model's input size, and drawing predictions;
training-time augmentation (`augment`, `mix`, POLICY_OPS) lives in tunesmith/image_augment.py, imported here.

An image value in a row is one of: a file path; an IDX reference `FILE#INDEX` (MNIST-format files, see
`read_idx`); a `data:` URI (HF dataset images kept JSON-friendly); a dict {"bytes", "path"}; a PIL image;
a numpy array [H, W] or [H, W, C]. `load_image` turns each into an RGB PIL image (grayscale: the one
channel repeated; 16-bit: scaled to 8 bits), the same way transformers' pipeline loads a file.
"""
from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import io
import math
import os
import re
import struct
import warnings

import numpy as np
import torch

from tunesmith.image_augment import POLICY_OPS, augment, mix  # noqa: F401   (re-exported: vision.augment)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --- reading ------------------------------------------------------------------------------------------

def is_idx(name: str) -> bool:
    """IDX files are named like `train-images-idx3-ubyte(.gz)`."""
    return bool(re.search(r"idx\d", name)) and "ubyte" in name


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) as an array: images [N, H, W], labels [N]. Read once per process
    (again when the file changes)."""
    stat = os.stat(path)
    return _read_idx(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] or data[1] or data[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=IDX_TYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != math.prod(dims):
        raise ValueError(f"{path}: truncated: the header says {dims} ({math.prod(dims):,} values), "
                         f"the file holds {array.size:,}")
    return array.reshape(dims)


def labels_file(images: str) -> str | None:
    """The IDX labels file beside an images file (`*-images-idx3-*` -> `*-labels-idx1-*`), if present."""
    head, name = os.path.split(images)
    if "images" not in name:
        return None
    path = os.path.join(head, name.replace("images", "labels").replace("idx3", "idx1"))
    return path if os.path.isfile(path) else None


def data_uri(raw: bytes) -> str:
    kind = "png" if raw[:4] == b"\x89PNG" else "jpeg" if raw[:2] == b"\xff\xd8" else "octet-stream"
    return f"data:{'image' if kind != 'octet-stream' else 'application'}/{kind};base64," \
           + base64.b64encode(raw).decode()


def hf_value(value):
    """An undecoded HF Image value {"bytes", "path"} as a path (when it is a local file) or a data: URI."""
    if value.get("bytes"):
        return data_uri(value["bytes"])
    return value.get("path")


def _source(value):
    """What PIL can open, or an array, for one image value."""
    from PIL import Image

    if isinstance(value, Image.Image) or isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        return _source(value.get("bytes") or value.get("path"))
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"not an image value: {type(value).__name__}")
    if value.startswith("data:"):
        return io.BytesIO(base64.b64decode(value.split(",", 1)[1]))
    if not os.path.isfile(value) and "#" in value:
        path, _, index = value.rpartition("#")
        if is_idx(os.path.basename(path)) and index.isdigit():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"IDX file not found: {path}")
            images = read_idx(path)
            if int(index) >= len(images):
                raise ValueError(f"{path} holds {len(images):,} images, no index {index}")
            return images[int(index)]
    if not os.path.isfile(value):
        raise FileNotFoundError(f"image file not found: {value}")
    return value


def pixels(value) -> int:
    """Width x height of an image value read from its header only (no decoding)."""
    from PIL import Image

    src = _source(value)
    if isinstance(src, np.ndarray):
        return int(src.shape[0] * src.shape[1])
    if isinstance(src, Image.Image):
        return src.size[0] * src.size[1]
    with warnings.catch_warnings():                 # PIL's DecompressionBombWarning: the caller judges the size
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(src) as image:              # reads the header only
            return image.size[0] * image.size[1]


def load_image(value):
    """An RGB PIL image for one image value (see the module docstring). Raises on unreadable data."""
    from PIL import Image, ImageOps

    src = _source(value)
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8:                   # floats in [0, 1] or wider integers: to 0..255
            a = src.astype(np.float64)
            src = (a * 255 if a.max() <= 1 else a).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(src)
    elif isinstance(src, Image.Image):
        image = src
    else:
        image = Image.open(src)
        image.load()                                # decode now: a truncated file fails here, with its path
        image = ImageOps.exif_transpose(image)      # as transformers.image_utils.load_image does
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):      # 16-bit or float scans: scale to 0..255
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(a.max(), 1.0)
        image = Image.fromarray((a / top * 255).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def describe(value) -> str:
    """A short name for an image value in messages (never a whole data: URI)."""
    if isinstance(value, str):
        return value[:40] + "..." if value.startswith("data:") else value
    return type(value).__name__


def check_image(value) -> str | None:
    """Why this image value cannot be used (with its path), or None; decodes it fully."""
    try:
        load_image(value)
    except FileNotFoundError as e:
        return str(e)
    except Exception as e:                          # PIL raises OSError, SyntaxError, ValueError, ...
        return f"unreadable image {describe(value)}: {type(e).__name__}: {e}"
    return None


def image_key(value) -> str:
    """Hash of the decoded pixels (size and RGB bytes): equal for the same picture in any container."""
    image = load_image(value)
    return "sha1:" + hashlib.sha1(repr(image.size).encode() + image.tobytes()).hexdigest()


# --- sizes from the model's image processor ------------------------------------------------------------

def _fields(size) -> dict:
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return {k: get(k) for k in ("height", "width", "shortest_edge", "longest_edge") if get(k)}


def input_size(processor) -> int:
    """The square side (pixels) the processor gives the model."""
    crop = _fields(getattr(processor, "crop_size", None) or {})
    if getattr(processor, "do_center_crop", False) and crop:
        return crop.get("height") or crop["shortest_edge"]
    size = _fields(processor.size)
    return size.get("height") or size.get("shortest_edge") or size["longest_edge"]


def set_input_size(processor, side: int) -> None:
    """Scale the processor's resize and crop sizes so that it gives `side` x `side` pixels."""
    factor = side / input_size(processor)
    processor.size = {k: round(v * factor) for k, v in _fields(processor.size).items()}
    if getattr(processor, "crop_size", None):
        processor.crop_size = {k: round(v * factor) for k, v in _fields(processor.crop_size).items()}


def normalization(processor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [3, 1, 1] such that pixel_values = uint8 pixels * scale + shift, as the processor does."""
    rescale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
    mean, std = [0.0] * 3, [1.0] * 3
    if getattr(processor, "do_normalize", True):
        mean, std = list(processor.image_mean), list(processor.image_std)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return rescale / std, -mean / std


# --- drawing predictions -----------------------------------------------------------------------------------------

def draw_boxes(value, boxes: list[dict], color: tuple[int, int, int] = (230, 50, 50)):
    """The image `value` as an RGB PIL image with each predicted box ({box: xyxy pixels, label, score}) drawn on it:
    an outline and "label score" above it, red unless `color` (`tunesmith predict --out`, as the serve page draws
    them; the report draws the true boxes in green under the predicted ones)."""
    from PIL import ImageDraw

    image = load_image(value)
    draw = ImageDraw.Draw(image)
    width = max(2, image.width // 200)
    for b in boxes:
        x0, y0, x1, y1 = b["box"]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
        draw.text((x0 + 2, max(y0 - 12, 0)), f"{b['label']} {b['score']:.2f}", fill=color)
    return image
