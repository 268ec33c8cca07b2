"""Training-time image augmentation in plain torch (re-exported by tunesmith/vision.py: vision.augment, vision.mix).

Augmentation works on a batch x: [B, 3, H, W] floats in [0, 1]. Every random draw comes from the
`generator` passed in (CPU), so a seed gives the same images. Geometric ops (crop, flip, rotation, shear,
translation) compose into one affine matrix per image, applied with a single bilinear grid_sample.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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
