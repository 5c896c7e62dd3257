"""Image preprocessing for the Pixtral tower (Mistral 3, Pixtral-12B), as transformers' PixtralImageProcessor does
it under PixtralProcessor, with Pillow.

An image is converted to RGB (transparency composited onto white), scaled down (keeping the aspect ratio) to fit
the processor's size box if it is larger, then resized (bicubic) up to the next multiples of patch_size *
spatial_merge_size (the processor passes that product as the patch size, so that whole merged patches tile it),
scaled to [0, 1] and normalised by the mean and std. The tower cuts it into patches itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .image import open_image, to_rgb


@dataclass(frozen=True)
class PixtralImageSettings:
    unit: int                       # sides become multiples of this: patch_size * spatial_merge_size
    max_size: tuple[int, int]       # (height, width) the image is scaled down into
    resample: int                   # PIL's filter code
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: Any) -> "PixtralImageSettings":
        size = config.vision_size
        box = (size["longest_edge"],) * 2 if "longest_edge" in size else (size["height"], size["width"])
        return cls(config.vision_patch_size["height"] * config.vision_spatial_merge_size, box, config.vision_resample,
                   config.vision_rescale_factor, tuple(config.vision_image_mean), tuple(config.vision_image_std))


def target_size(height: int, width: int, max_size: tuple[int, int], unit: int) -> tuple[int, int]:
    """The processor's output size: scaled down into max_size (sides floored), then each side rounded up to a
    multiple of `unit`."""
    ratio = max(height / max_size[0], width / max_size[1])
    if ratio > 1:
        height, width = math.floor(height / ratio), math.floor(width / ratio)
    if height < 1 or width < 1:
        raise InputError(f"the image's aspect ratio is too extreme: it shrinks to {width}x{height} pixels inside "
                         f"{max_size[1]}x{max_size[0]}")
    return ((height - 1) // unit + 1) * unit, ((width - 1) // unit + 1) * unit


def preprocess_pixtral(image: Any, s: PixtralImageSettings) -> torch.Tensor:
    """(channels, height, width) float32 pixel values; height and width are multiples of s.unit."""
    from PIL import Image

    img = to_rgb(open_image(image))
    h, w = target_size(img.height, img.width, s.max_size, s.unit)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.Resampling(s.resample))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(s.rescale_factor)
    mean = np.asarray(s.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(s.std, dtype=np.float32).reshape(-1, 1, 1)
    return torch.from_numpy(np.ascontiguousarray((x - mean) / std))
