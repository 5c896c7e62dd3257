"""Reading an image for any vision family: from a PIL image, a path or encoded bytes, with Pillow; converted to
RGB the way the HF image processors do it."""

from __future__ import annotations

import io
import os
from typing import Any

from ..errors import InputError


def open_image(image: Any):
    """A PIL image from a PIL image, a path or encoded bytes; a clear InputError for anything unreadable."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise ImportError("images need Pillow: pip install pillow (or exllamav2[vision])") from e

    if isinstance(image, Image.Image):
        return image
    try:
        if isinstance(image, (bytes, bytearray)):
            img = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            img = Image.open(image)
        else:
            raise InputError(f"image must be a PIL image, a path or encoded bytes, got {type(image).__name__}")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        name = image if isinstance(image, (str, os.PathLike)) else f"{len(image)} bytes"
        raise InputError(f"cannot read the image {name}: {e}") from e
    return img


def to_rgb(img):
    """RGB, with any transparency composited onto white (as the HF processor does; a plain convert would keep
    the colour under transparent pixels)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")
