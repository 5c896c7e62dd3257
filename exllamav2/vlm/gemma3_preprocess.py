"""Image preprocessing for Gemma 3, as transformers' Gemma3ImageProcessor does it (without pan and scan), with
Pillow.

An image is converted to RGB (transparency composited onto white), resized to the tower's square image size with
the configured filter (whatever its aspect ratio), scaled by rescale_factor, normalised by the mean and std, and
cut into patch x patch squares, row-major, each flattened channel-major as the checkpoint's patch convolution
reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .image import open_image, to_rgb


@dataclass(frozen=True)
class Gemma3ImageSettings:
    image_size: int
    patch_size: int
    resample: int               # PIL's filter code
    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: Any) -> "Gemma3ImageSettings":
        return cls(config.vision_image_size, config.vision_patch_size["height"], config.vision_resample,
                   config.vision_rescale_factor, tuple(config.vision_image_mean), tuple(config.vision_image_std))


def pixel_values_gemma3(image: Any, s: Gemma3ImageSettings) -> torch.Tensor:
    """The processor's pixel_values of one image: (3, image_size, image_size) float32."""
    img = to_rgb(open_image(image))
    if img.size != (s.image_size, s.image_size):
        img = img.resize((s.image_size, s.image_size), resample=s.resample)
    # the processor scales in float64, then rounds to float32 before normalising
    x = (np.asarray(img, dtype=np.float64).transpose(2, 0, 1) * s.rescale_factor).astype(np.float32)
    mean = np.asarray(s.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(s.std, dtype=np.float32).reshape(-1, 1, 1)
    return torch.from_numpy((x - mean) / std)


def preprocess_gemma3(image: Any, s: Gemma3ImageSettings) -> torch.Tensor:
    """Patches of one image: (patches, 3 * patch * patch) float32, row-major over the image."""
    x = pixel_values_gemma3(image, s)
    c, p, g = x.shape[0], s.patch_size, s.image_size // s.patch_size
    return x.reshape(c, g, p, g, p).permute(1, 3, 0, 2, 4).reshape(g * g, c * p * p).contiguous()
