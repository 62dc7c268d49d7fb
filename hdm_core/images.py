"""The one image reader of the project (img2img inputs, training data): any file Pillow decodes becomes the 8-bit
RGB picture a person sees in a viewer, with every conversion Pillow's plain `convert("RGB")` gets wrong done right.

* EXIF orientation is applied (a phone photo with Orientation 6 is upright, with its true aspect ratio);
* 16-bit and 32-bit greyscale (`I;16`, `I`, `F`) are scaled to 8 bits, not clipped to white;
* transparency is composited onto a background instead of being dropped (what lay under it is arbitrary);
* the file is decoded fully here, so a truncated file fails now, with its name, not later.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # under transparent pixels
MAX_PIXELS = 64_000_000  # larger files are refused before decoding (Pillow's own guard warns at 89 MP)


def open_rgb(source: str | os.PathLike | bytes, *, background: tuple[int, int, int] = BACKGROUND,
             max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image in `source` (a path or the file's bytes) as 8-bit RGB, upright; raises ValueError naming it."""
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():  # the size is checked below, with a message of ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        if img.width * img.height > max_pixels:
            raise ValueError(f"{img.width}x{img.height} is over the {max_pixels / 1e6:.0f} MP limit; downscale it")
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise ValueError(f"cannot read {name}: it is over the {max_pixels / 1e6:.0f} MP limit ({err})") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {name}: {err}") from err
    if img.width < 1 or img.height < 1:
        raise ValueError(f"cannot read {name}: the image is empty")
    return to_rgb(img, background)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """8-bit RGB of any Pillow mode: high bit depths scaled, alpha composited onto `background`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _greyscale_to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return img.convert("RGB")


def _greyscale_to_8bit(img: Image.Image) -> Image.Image:
    """`I;16` (0..65535), `I` (32-bit int) or `F` (float) greyscale as 8-bit `L`: 16-bit data is divided by 257
    (65535 → 255); float data in [0, 1] is scaled by 255; anything else is clipped to 0..255."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr / 257.0
    elif img.mode == "F" and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
