"""Box-aware augmentation (tunesmith/tasks/box_augment.py): boxes follow the pixels, a flip is exact, boxes leaving
the image are clipped or dropped and counted, and the output depends on the given generator alone."""
import pytest
import torch
from pydantic import ValidationError

from tunesmith.tasks.box_augment import augment_boxes, clip_boxes
from tunesmith.tasks.box_augment_schema import BoxAugment

H, W = 48, 64
RECTS = [(12, 10, 40, 30), (44, 30, 60, 45)]          # x0, y0, x1, y1: pixel edges, exclusive ends


def scene(batch: int = 2):
    """Images with each rectangle filled in its own channel (so overlaps stay separable), its box and label."""
    images = torch.zeros(batch, 3, H, W)
    for c, (x0, y0, x1, y1) in enumerate(RECTS):
        images[:, c, y0:y1, x0:x1] = 1.0
    boxes = [torch.tensor(RECTS, dtype=torch.float32) for _ in range(batch)]
    labels = [torch.tensor([0, 1]) for _ in range(batch)]
    return images, boxes, labels


def extent(mask: torch.Tensor):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return None if not len(xs) else [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("settings", [BoxAugment(crop_scale=(0.3, 1.0)), BoxAugment(scale=(0.6, 1.5)),
                                      BoxAugment(crop_scale=(0.4, 1.0), scale=(0.8, 1.25), hflip=0.5)],
                         ids=["crop", "scale", "crop+scale+flip"])
def test_boxes_stay_on_their_pixels(settings):
    settings.min_visible = 0.0
    images, boxes, labels = scene(4)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(4):
        out, moved, kept, _ = augment_boxes(images, boxes, labels, settings, g)
        assert out.shape == images.shape
        for i in range(len(out)):
            for box, label in zip(moved[i].tolist(), kept[i].tolist()):
                seen = extent(out[i, label] > 0.5)          # the rectangle's pixels, in its channel
                if seen is None or min(seen[2] - seen[0], seen[3] - seen[1]) < 3:
                    continue                                # a sliver: too few pixels to compare
                assert max(abs(a - b) for a, b in zip(box, seen)) <= 1.5, (box, seen)
                checked += 1
    assert checked >= 10


def test_flips_map_coordinates_exactly():
    images, boxes, labels = scene()
    boxes[0] = torch.tensor([[12.25, 10.0, 40.5, 30.0], [0.0, 0.0, 3.0, 2.0]])
    out, moved, kept, dropped = augment_boxes(images, boxes, labels, BoxAugment(hflip=1.0), torch.Generator())
    assert torch.equal(out, images.flip(-1)) and dropped == 0
    for before, after in zip(boxes, moved):
        expected = torch.stack([W - before[:, 2], before[:, 1], W - before[:, 0], before[:, 3]], 1)
        assert torch.equal(after, expected)
    assert all(torch.equal(a, b) for a, b in zip(kept, labels))
    out, moved, _, _ = augment_boxes(images, boxes, labels, BoxAugment(vflip=1.0), torch.Generator())
    assert torch.equal(out, images.flip(-2))
    for before, after in zip(boxes, moved):
        assert torch.equal(after, torch.stack([before[:, 0], H - before[:, 3], before[:, 2], H - before[:, 1]], 1))


def test_mosaic_puts_four_images_in_quarters_with_their_boxes():
    images, boxes, labels = scene(4)
    for i in range(4):                                  # image i: its first rectangle moved i * 4 px right
        images[i, 0] = 0
        images[i, 0, 10:30, 12 + 4 * i:40 + 4 * i] = 1
        boxes[i][0] = torch.tensor([12.0 + 4 * i, 10, 40 + 4 * i, 30])
    g = torch.Generator().manual_seed(0)
    out, moved, kept, dropped = augment_boxes(images, boxes, labels, BoxAugment(mosaic=1.0, min_visible=0.0), g)
    assert dropped == 0 and out.shape == images.shape
    for i in range(4):
        assert len(moved[i]) == 8 and sorted(kept[i].tolist()) == [0] * 4 + [1] * 4
        for c in (0, 1):                               # every box of class c lies on its rectangle's pixels ...
            mask, mine = out[i, c] > 0.5, moved[i][kept[i] == c]
            for x0, y0, x1, y1 in mine.round().long().tolist():
                assert mask[y0:y1, x0:x1].float().mean() > 0.95
            area = ((mine[:, 2] - mine[:, 0]) * (mine[:, 3] - mine[:, 1])).sum()
            assert abs(mask.sum() - area) < 0.1 * area  # ... and no pixels of the class lie outside them
        top_left = moved[i][0]                         # the image itself, at half size in the top left quarter
        assert torch.allclose(top_left, boxes[i][0] / 2)
    again = augment_boxes(images, boxes, labels, BoxAugment(mosaic=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(again[0], out)
    none = augment_boxes(images, boxes, labels, BoxAugment(mosaic=1e-9), torch.Generator().manual_seed(0))
    assert none[0] is images


def test_clip_and_drop_counts():
    keep, clipped = clip_boxes(torch.tensor([[-10.0, 0, 10, 10],      # half inside: clipped, kept at 0.5
                                             [-18.0, 0, 2, 10],       # a tenth inside: dropped at 0.3
                                             [70.0, 5, 80, 9],        # wholly outside: dropped even at 0
                                             [30.0, 20, 20, 10]]),    # corners reversed: sorted, kept whole
                               W, H, min_visible=0.3)
    assert keep.tolist() == [True, False, False, True]
    assert clipped[0].tolist() == [0, 0, 10, 10] and clipped[3].tolist() == [20, 10, 30, 20]
    assert clip_boxes(torch.tensor([[70.0, 5, 80, 9]]), W, H, 0.0)[0].tolist() == [False]

    # a fixed 2x zoom about the centre (32, 24): the box at the corner leaves, the central one stays
    images = torch.zeros(1, 3, H, W)
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0], [28.0, 20.0, 36.0, 28.0], [2.0, 20.0, 22.0, 28.0]])]
    labels = [torch.tensor([3, 5, 7])]
    settings = BoxAugment(scale=(2.0, 2.0), min_visible=0.5)
    _, moved, kept, dropped = augment_boxes(images, boxes, labels, settings, torch.Generator().manual_seed(1))
    # x -> 2x - 32 and y -> 2y - 24 on edges: [2, 20, 22, 28] -> [-28, 16, 12, 32], 12 of 40 px wide inside: dropped
    assert dropped == 2 and kept[0].tolist() == [5]
    assert torch.allclose(moved[0], torch.tensor([[24.0, 16.0, 40.0, 32.0]]), atol=1e-3)
    settings.min_visible = 0.2                          # 12/40 = 0.3 left: kept now, clipped at x = 0
    _, moved, kept, dropped = augment_boxes(images, boxes, labels, settings, torch.Generator().manual_seed(1))
    assert dropped == 1 and kept[0].tolist() == [5, 7]
    assert torch.allclose(moved[0][1], torch.tensor([0.0, 16.0, 12.0, 32.0]), atol=1e-3)


def test_same_generator_state_same_output_and_global_rng_untouched():
    images, boxes, labels = scene()
    images = images * 0.5 + 0.25
    settings = BoxAugment(crop_scale=(0.3, 1.0), scale=(0.8, 1.2), hflip=0.5, brightness=0.3, contrast=0.3,
                          saturation=0.3, hue=0.05, min_visible=0.5)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [augment_boxes(images, boxes, labels, settings, g) for _ in range(3)]

    state = torch.get_rng_state()
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(state, torch.get_rng_state())           # kornia's draws came from a forked RNG
    for x, y in zip(a, b):
        assert torch.equal(x[0], y[0]) and x[3] == y[3]
        assert all(torch.equal(p, q) for p, q in zip(x[1] + x[2], y[1] + y[2]))
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[1][0])                    # each call draws afresh from the generator


def test_nothing_enabled_returns_the_inputs_and_still_draws_once():
    images, boxes, labels = scene()
    g = torch.Generator().manual_seed(0)
    out = augment_boxes(images, boxes, labels, BoxAugment(), g)
    assert out[0] is images and out[1] is boxes and out[3] == 0
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_settings_are_checked():
    for bad in ({"crop_scale": [0.9, 0.5]}, {"crop_scale": [0.5, 1.5]}, {"scale": [0, 1]}, {"hflip": 2},
                {"rotation": 5}, {"mosaic": 1.5}):
        with pytest.raises(ValidationError):
            BoxAugment(**bad)
    assert not BoxAugment().enabled and BoxAugment(hue=0.1).enabled and not BoxAugment(hue=0.1).geometric
