"""Images: reading them from any source a row may hold, and training-time augmentation in plain torch.

An image value in a row is one of: a file path; an IDX reference `FILE#INDEX` (MNIST-format files, see
`read_idx`); a `data:` URI (HF dataset images kept JSON-friendly); a dict {"bytes", "path"}; a PIL image;
a numpy array [H, W] or [H, W, C]. `load_image` turns each into an RGB PIL image (grayscale: the one
channel repeated; 16-bit: scaled to 8 bits), the same way transformers' pipeline loads a file.

Augmentation works on a batch x: [B, 3, H, W] floats in [0, 1]. Every random draw comes from the
`generator` passed in (CPU), so a seed gives the same images. Geometric ops (crop, flip, rotation, shear,
translation) compose into one affine matrix per image, applied with a single bilinear grid_sample.
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
import torch.nn.functional as F

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


# --- augmentation ----------------------------------------------------------------------------------------

def _uniform(n: int, lo: float, hi: float, g) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x [B, C, H, W] with theta [B, 2, 3] (output -> input, normalized coordinates); zeros outside."""
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometry(n: int, shape, cfg, g) -> torch.Tensor | None:
    """theta [B, 2, 3] for random resized crop, flips and rotation; None when all are off."""
    if not (cfg.crop_scale or cfg.hflip or cfg.vflip or cfg.rotation):
        return None
    h, w = shape[-2:]
    sx, sy, tx, ty = torch.ones(n), torch.ones(n), torch.zeros(n), torch.zeros(n)
    if cfg.crop_scale:                              # area fraction and aspect ratio, as torchvision samples them
        area = _uniform(n, *cfg.crop_scale, g)
        ratio = torch.exp(_uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g))
        sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        tx, ty = (2 * torch.rand(n, generator=g) - 1) * (1 - sx), (2 * torch.rand(n, generator=g) - 1) * (1 - sy)
    sx = sx * torch.where(torch.rand(n, generator=g) < cfg.hflip, -1.0, 1.0)
    sy = sy * torch.where(torch.rand(n, generator=g) < cfg.vflip, -1.0, 1.0)
    angle = _uniform(n, -cfg.rotation, cfg.rotation, g) * math.pi / 180
    return _rotate_scale(angle, sx, sy, tx, ty, w / h)


def _rotate_scale(angle, sx, sy, tx, ty, aspect: float) -> torch.Tensor:
    """theta = [diag(sx, sy) @ R(angle) | (tx, ty)], R in pixel space (so non-square images do not shear)."""
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(len(angle), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = sx * cos, -sx * sin / aspect, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sy * sin * aspect, sy * cos, ty
    return theta


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)   # [B, 1, H, W]


def _blend(x, other, factor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, per image; factor [B]."""
    f = factor.to(x).view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device, dtype=x.dtype) / 13
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(x.shape[1], 1, 3, 3), groups=x.shape[1])
    return out


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` turns [B], in YIQ space (a linear approximation of HSV's hue)."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = shift * 2 * math.pi
    rot = torch.zeros(len(a), 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 2, 2] = 1, a.cos(), a.cos()
    rot[:, 1, 2], rot[:, 2, 1] = -a.sin(), a.sin()
    m = (torch.linalg.inv(yiq) @ rot @ yiq).to(x)                    # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per image and channel, on 256 levels."""
    b, c, h, w = x.shape
    levels = (x * 255).round().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    cdf = hist.cumsum(1)
    low = cdf.gather(1, levels.min(1, keepdim=True).values)          # count at the darkest level present
    lut = ((cdf - low) / (h * w - low).clamp(min=1)).clamp(0, 1)
    out = lut.gather(1, levels).view(b, c, h, w).to(x)
    return torch.where((low == h * w).view(b, c, 1, 1), x, out)      # a flat channel stays as it is


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    mask = (256 - 2 ** (8 - bits.long())).to(x.device).view(-1, 1, 1, 1)
    return ((x * 255).round().long() & mask).to(x) / 255


# name -> (op(x, m, g) with m [B] in [0, 1] the magnitude; signed: a random sign is applied to m)
def _geo(kind: str, limit_std: float, limit_wide: float):
    def op(x, m, g, wide):
        n, amount = len(m), m * (limit_wide if wide else limit_std)
        z, one = torch.zeros(n), torch.ones(n)
        if kind == "rotate":
            theta = _rotate_scale(amount * math.pi / 180, one, one, z, z, x.shape[-1] / x.shape[-2])
        else:
            theta = torch.eye(2, 3).repeat(n, 1, 1)
            index = {"shear_x": (0, 1), "shear_y": (1, 0), "translate_x": (0, 2), "translate_y": (1, 2)}[kind]
            theta[:, index[0], index[1]] = amount * (2 if kind.startswith("translate") else 1)
        return _affine(x, theta)
    return op


POLICY_OPS = {   # (op, signed); magnitude ranges follow torchvision's RandAugment / TrivialAugmentWide
    "identity": (lambda x, m, g, wide: x, False),
    "shear_x": (_geo("shear_x", 0.3, 0.99), True),
    "shear_y": (_geo("shear_y", 0.3, 0.99), True),
    "translate_x": (_geo("translate_x", 150 / 331, 32 / 224), True),     # fraction of the width
    "translate_y": (_geo("translate_y", 150 / 331, 32 / 224), True),
    "rotate": (_geo("rotate", 30, 135), True),
    "brightness": (lambda x, m, g, wide: _blend(x, torch.zeros_like(x), 1 + m * (0.99 if wide else 0.9)), True),
    "color": (lambda x, m, g, wide: _blend(x, _gray(x), 1 + m * (0.99 if wide else 0.9)), True),
    "contrast": (lambda x, m, g, wide: _blend(x, _gray(x).mean((2, 3), keepdim=True), 1 + m * (0.99 if wide else 0.9)),
                 True),
    "sharpness": (lambda x, m, g, wide: _blend(x, _blur(x), 1 + m * (0.99 if wide else 0.9)), True),
    "posterize": (lambda x, m, g, wide: _posterize(x, 8 - (m * (6 if wide else 4)).round()), False),
    "solarize": (lambda x, m, g, wide: torch.where(x >= (1 - m).to(x).view(-1, 1, 1, 1), 1 - x, x), False),
    "autocontrast": (lambda x, m, g, wide: _autocontrast(x), False),
    "equalize": (lambda x, m, g, wide: _equalize(x), False),
}


def _policy(x: torch.Tensor, cfg, g) -> torch.Tensor:
    """RandAugment (num_ops ops at magnitude/30) or TrivialAugment (one op, random magnitude), per image."""
    names = list(POLICY_OPS)
    wide = cfg.policy == "trivialaugment"
    rounds = 1 if wide else cfg.num_ops
    for _ in range(rounds):
        choice = torch.randint(len(names), (len(x),), generator=g)
        level = torch.randint(31, (len(x),), generator=g) / 30 if wide else torch.full((len(x),), cfg.magnitude / 30)
        sign = torch.where(torch.rand(len(x), generator=g) < 0.5, -1.0, 1.0)
        out = x.clone()
        for k, name in enumerate(names):
            sel = (choice == k).nonzero().flatten()
            if len(sel):
                op, signed = POLICY_OPS[name]
                m = level[sel] * (sign[sel] if signed else 1)
                out[sel.to(x.device)] = op(x[sel.to(x.device)], m, g, wide)
        x = out
    return x


def augment(x: torch.Tensor, cfg, g: torch.Generator) -> torch.Tensor:
    """Random crop/flip/rotation, colour jitter, then RandAugment/TrivialAugment; x [B, 3, H, W] in [0, 1]."""
    n = len(x)
    theta = _geometry(n, x.shape, cfg, g)
    if theta is not None:
        x = _affine(x, theta)
    if cfg.brightness:
        x = _blend(x, torch.zeros_like(x), _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g))
    if cfg.contrast:
        x = _blend(x, _gray(x).mean((2, 3), keepdim=True), _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g))
    if cfg.saturation:
        x = _blend(x, _gray(x), _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, g))
    if cfg.hue:
        x = _hue(x, _uniform(n, -cfg.hue, cfg.hue, g))
    if cfg.policy != "none":
        x = _policy(x, cfg, g)
    return x


def mix(x: torch.Tensor, targets: torch.Tensor, cfg, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of a batch with a permutation of itself; targets [B, C] probabilities, mixed alike."""
    kinds = [(k, a) for k, a in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if a > 0]
    if not kinds or len(x) < 2 or float(torch.rand(1, generator=g)) >= cfg.mix_prob:
        return x, targets
    kind, alpha = kinds[int(torch.randint(len(kinds), (1,), generator=g))]
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))   # Beta: numpy, seeded from g
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=g).to(x.device)
    if kind == "mixup":
        x = lam * x + (1 - lam) * x[perm]
    else:                                           # a box of area (1 - lam) comes from the partner image
        h, w = x.shape[-2:]
        ch, cw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, lam * targets + (1 - lam) * targets[perm.to(targets.device)]


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
