"""tunesmith/vision.py: image values of every kind load to RGB; IDX files; seeded augmentation and mixing."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from tunesmith import vision
from tunesmith.tasks.schema import AugmentConfig


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file (MNIST format), gzipped when the name ends in .gz."""
    codes = {np.dtype(np.uint8): 0x08}
    head = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(head + array.tobytes())


def batch(n=6, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_idx_round_trip_refs_and_truncation(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 7, 9), dtype=np.uint8)
    path = tmp_path / "x-images-idx3-ubyte.gz"
    write_idx(path, images)
    assert np.array_equal(vision.read_idx(str(path)), images)
    pic = vision.load_image(f"{path}#3")
    assert pic.mode == "RGB" and pic.size == (9, 7)
    rgb = np.asarray(pic)
    assert all(np.array_equal(rgb[..., c], images[3]) for c in range(3))        # grayscale: channel repeated
    assert "no index 9" in vision.check_image(f"{path}#9")
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 7, 9) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        vision.read_idx(str(bad))


def test_every_kind_of_image_value_loads_the_same_pixels(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    raw = path.read_bytes()
    values = [str(path), vision.data_uri(raw), {"bytes": raw, "path": None}, Image.open(path), array, raw]
    for v in values:
        assert np.array_equal(np.asarray(vision.load_image(v)), array), type(v)
    assert len({vision.image_key(v) for v in values}) == 1                       # same picture, same key


def test_16_bit_scan_is_scaled_not_clipped(tmp_path):
    scan = (np.linspace(0, 65535, 64).reshape(8, 8)).astype(np.uint16)
    path = tmp_path / "xray.png"
    Image.fromarray(scan).save(path)
    out = np.asarray(vision.load_image(str(path)))[..., 0]
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 32


def test_unreadable_images_give_a_reason_with_the_path(tmp_path):
    good = tmp_path / "g.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    truncated = tmp_path / "t.png"
    truncated.write_bytes(good.read_bytes()[:40])
    fake = tmp_path / "f.jpg"
    fake.write_text("not an image")
    assert vision.check_image(str(good)) is None
    for p in (truncated, fake):
        reason = vision.check_image(str(p))
        assert reason and str(p) in reason and "unreadable image" in reason
    assert "not found" in vision.check_image(str(tmp_path / "missing.png"))


def test_processor_sizes_scale_to_image_size():
    from transformers import MobileNetV2ImageProcessorPil, ViTImageProcessorPil

    p = MobileNetV2ImageProcessorPil()                        # resize 256, crop 224
    assert vision.input_size(p) == 224
    vision.set_input_size(p, 64)
    assert vision.input_size(p) == 64 and p.size == {"shortest_edge": 73}
    out = p([Image.new("RGB", (28, 40))], return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, 64, 64)
    v = ViTImageProcessorPil(size={"height": 224, "width": 224})
    vision.set_input_size(v, 32)
    assert v([Image.new("L", (10, 10)).convert("RGB")], return_tensors="np")["pixel_values"].shape == (1, 3, 32, 32)


FULL = dict(crop_scale=(0.3, 1), hflip=0.5, vflip=0.2, rotation=30, brightness=0.4, contrast=0.4, saturation=0.4,
            hue=0.1)


@pytest.mark.parametrize("cfg", [FULL, dict(policy="randaugment", num_ops=2, magnitude=9),
                                 dict(policy="trivialaugment")])
def test_augment_is_reproducible_with_a_seed_and_changes_images(cfg):
    cfg = AugmentConfig(**cfg)
    x = batch()
    a = vision.augment(x, cfg, torch.Generator().manual_seed(7))
    b = vision.augment(x, cfg, torch.Generator().manual_seed(7))
    c = vision.augment(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().flatten(1).amax(1).gt(1e-3).sum() >= 4           # most images changed


def test_geometry_is_exact_for_flips_and_identity_for_full_crop():
    x = batch(n=4)
    flip = vision.augment(x, AugmentConfig(hflip=1.0), torch.Generator().manual_seed(0))
    assert torch.allclose(flip, x.flip(-1), atol=1e-5)
    same = vision.augment(x, AugmentConfig(crop_scale=(1, 1), crop_ratio=(1, 1)), torch.Generator().manual_seed(0))
    assert torch.allclose(same, x, atol=1e-5)
    assert torch.equal(vision.augment(x, AugmentConfig(), torch.Generator()), x)        # nothing asked: untouched


def test_every_policy_op_keeps_range_and_shape():
    x = batch(n=3)
    for name, (op, signed) in vision.POLICY_OPS.items():
        for wide in (False, True):
            out = op(x, torch.tensor([0.5, -0.7, 1.0]) if signed else torch.tensor([0.5, 0.7, 1.0]), None, wide)
            assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 + 1e-6, name
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert torch.equal(vision.POLICY_OPS["equalize"][0](flat, torch.zeros(1), None, False), flat)


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_blends_images_and_targets_alike(kind):
    cfg = AugmentConfig(**{kind: 1.0})
    x = batch(n=8)
    targets = torch.nn.functional.one_hot(torch.arange(8) % 4, 4).float()
    mx, mt = vision.mix(x, targets, cfg, torch.Generator().manual_seed(3))
    mx2, mt2 = vision.mix(x, targets, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(mx, mx2) and torch.equal(mt, mt2)
    assert torch.allclose(mt.sum(1), torch.ones(8))
    assert not torch.equal(mx, x) and (mt.max(1).values < 1).any()
    if kind == "cutmix":                       # each pixel comes from one image or its partner, unblended
        assert torch.isin(mx, x).all()
