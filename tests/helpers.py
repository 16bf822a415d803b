"""Small helpers shared by the test files (plain functions, not fixtures)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def make_image(seed: int, width: int = 90, height: int = 60) -> Image.Image:
    """A reproducible random RGB image."""
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
