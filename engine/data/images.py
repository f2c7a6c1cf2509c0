"""Image helpers of the converters: ADM centre crop, encoding to bytes, reading image files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")


def center_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, used by DiT): halve with a box filter while the short
    side is at least 2*size, resize the short side to `size` (bicubic), crop the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=PIL.Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=PIL.Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def load_rgb_crop(path: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3] centre crop of an image file; raises on an unreadable file."""
    with PIL.Image.open(path) as image:
        image.load()  # decode everything now: a truncated file fails here, not later
        return center_crop(image.convert("RGB"), size)


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    """PNG (lossless) or JPEG (quality 95) bytes of a uint8 [H, W] or [H, W, 3] array."""
    buffer = io.BytesIO()
    image = PIL.Image.fromarray(array)
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS
