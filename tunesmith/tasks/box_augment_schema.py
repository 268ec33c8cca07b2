"""Box-aware augmentation settings (object detection's `augment` section); no torch, so a recipe can hold them.

tunesmith/tasks/box_augment.py applies them: the pixels move and the boxes (xyxy, pixels) follow them. The names
match image classification's `augment` keys where the meaning is the same.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from tunesmith.recipe import Section


class BoxAugment(Section):
    """Training-time augmentation of images with boxes, drawn per image from the run's seeded generator."""
    crop_scale: tuple[float, float] | None = None  # random resized crop: area fraction range, e.g. [0.5, 1]; None: off
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio (width / height) range
    hflip: float = Field(0.0, ge=0, le=1)       # probability of a horizontal flip
    vflip: float = Field(0.0, ge=0, le=1)       # probability of a vertical flip (aerial and microscope images)
    scale: tuple[float, float] | None = None    # zoom factor range about the centre, e.g. [0.8, 1.2] (below 1 pads
                                                # with black, above 1 cuts the border); None: off
    brightness: float = Field(0.0, ge=0, lt=1)  # factor uniform in [1 - x, 1 + x]
    contrast: float = Field(0.0, ge=0, lt=1)    # factor uniform in [1 - x, 1 + x]
    saturation: float = Field(0.0, ge=0, lt=1)  # factor uniform in [1 - x, 1 + x]
    hue: float = Field(0.0, ge=0, le=0.5)       # shift in turns, uniform in [-x, x]
    mosaic: float = Field(0.0, ge=0, le=1)      # probability that a batch image becomes a 2x2 mosaic of itself and
                                                # three others of the batch, each at half size (boxes follow)
    min_visible: float = Field(0.3, ge=0, le=1)  # a box cut by the image border is dropped when less than this
                                                # fraction of its (moved) area is left inside; 0: keep any sliver

    @field_validator("crop_scale", "crop_ratio", "scale")
    @classmethod
    def _range(cls, v):
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError("a range [low, high] with 0 < low <= high")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _fraction(cls, v):
        if v is not None and v[1] > 1:
            raise ValueError("crop_scale is a fraction of the image's area: at most 1")
        return v

    @property
    def geometric(self) -> bool:
        """True when a step moves pixels (boxes must follow)."""
        return bool(self.crop_scale or self.hflip or self.vflip or self.scale or self.mosaic)

    @property
    def enabled(self) -> bool:
        return self.geometric or bool(self.brightness or self.contrast or self.saturation or self.hue)
