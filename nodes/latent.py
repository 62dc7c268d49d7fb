"""What HDM Empty Latent does (no ComfyUI: unit-tested as it is): a zero latent at an HDM-friendly size (about one
megapixel, sides multiples of 32) or any multiple of 16. The node shell is in sampling_nodes.py."""

from __future__ import annotations

from typing import Any

import torch

from ..hdm_core.config import latent_size

RESOLUTIONS = {
    "1024x1024 (1:1)": (1024, 1024),
    "1152x896 (9:7)": (1152, 896),
    "896x1152 (7:9)": (896, 1152),
    "1152x864 (4:3)": (1152, 864),
    "864x1152 (3:4)": (864, 1152),
    "1216x832 (3:2)": (1216, 832),
    "832x1216 (2:3)": (832, 1216),
    "1344x896 (3:2, HDM example)": (1344, 896),
    "896x1344 (2:3)": (896, 1344),
    "1344x768 (16:9)": (1344, 768),
    "768x1344 (9:16)": (768, 1344),
    "1536x640 (21:9)": (1536, 640),
    "640x1536 (9:21)": (640, 1536),
}
DEFAULT_RESOLUTION = "1024x1024 (1:1)"
CUSTOM = "custom (width x height below)"
PATCH_SIZE = 2  # of every released XUT; a pixel side must be a multiple of VAE factor × patch size
MAX_BATCH = 4096


def empty_latent(resolution: str, width: int, height: int, batch_size: int, vae: Any = None
                 ) -> tuple[dict, int, int]:
    """(LATENT, pixel width, pixel height): zeros of the preset's size, or width × height for CUSTOM; the latent's
    channels and scale are the EQ-VAE's (4, 1/8) unless a VAE says otherwise (pixel space: 3, 1)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be a whole number from 1 to {MAX_BATCH}, got {batch_size!r}: it is the "
                         f"number of images to make")
    if resolution != CUSTOM:
        if resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {resolution!r}; pick one of the list or {CUSTOM!r}")
        width, height = RESOLUTIONS[resolution]
    channels, downscale = 4, 8
    if vae is not None:
        channels, downscale = vae.latent_channels, vae.spacial_compression_encode()
    lat_h, lat_w = latent_size(width, height, downscale=downscale, patch=PATCH_SIZE)
    return {"samples": torch.zeros(batch_size, channels, lat_h, lat_w)}, width, height
