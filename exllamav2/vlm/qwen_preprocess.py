"""Image preprocessing for the Qwen2-VL family, as transformers' Qwen2-VL image processor does it, with Pillow.

An image is converted to RGB (transparency composited onto white), resized (bicubic) to the nearest size whose sides are multiples of
patch_size * merge_size with a pixel count within [min_pixels, max_pixels] ("smart resize"), scaled to [0, 1],
normalised by the CLIP mean and std, and cut into patches of channels x temporal_patch_size x patch x patch
(a still image repeats itself over the temporal patch), ordered so that the merge_size x merge_size patches
that the merger joins are adjacent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .image import open_image, to_rgb

MAX_ASPECT = 200        # the HF processor refuses more extreme images


@dataclass(frozen=True)
class QwenImageSettings:
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: Any) -> "QwenImageSettings":
        return cls(config.vision_patch_size["height"], config.vision_spatial_merge_size,
                   config.vision_temporal_patch_size, config.vision_min_pixels, config.vision_max_pixels,
                   config.vision_rescale_factor, tuple(config.vision_image_mean), tuple(config.vision_image_std))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's target size: sides rounded to multiples of `factor`, then scaled (keeping the aspect ratio)
    into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(f"image of {width}x{height} has an aspect ratio over {MAX_ASPECT}, which the model's "
                         f"processor refuses")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_qwen(image: Any, s: QwenImageSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(patches (grid_t * grid_h * grid_w, C * temporal * patch * patch) float32, (grid_t, grid_h, grid_w))."""
    from PIL import Image

    img = to_rgb(open_image(image))
    h, w = smart_resize(img.height, img.width, s.patch_size * s.merge_size, s.min_pixels, s.max_pixels)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(s.rescale_factor)
    mean = np.asarray(s.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(s.std, dtype=np.float32).reshape(-1, 1, 1)
    x = (x - mean) / std
    return _patchify(torch.from_numpy(x), s)


def _patchify(x: torch.Tensor, s: QwenImageSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    c, h, w = x.shape
    p, m, t = s.patch_size, s.merge_size, s.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)    # merge blocks, then patches
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)                                # a still image over time
    return x.reshape(gh * gw, c * t * p * p).contiguous(), (1, gh, gw)
