"""Empty latent with HDM-friendly sizes (about one megapixel, sides multiples of 64) or any multiple of 16."""

from __future__ import annotations

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
CUSTOM = "custom (width x height below)"
PATCH_SIZE = 2  # of every released XUT; a pixel side must be a multiple of VAE factor × patch size


class HDMEmptyLatent:
    DESCRIPTION = ("Empty latent for HDM: pick an about-one-megapixel size for a common aspect ratio, or 'custom' "
                   "with width and height multiples of 16. Connect the VAE for pixel-space HDM models.")
    CATEGORY = "HDM/latent"
    RETURN_TYPES = ("LATENT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    OUTPUT_TOOLTIPS = ("Zero latent of the chosen size.", "Pixel width.", "Pixel height.")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "resolution": ([*RESOLUTIONS, CUSTOM], {"default": "1024x1024 (1:1)"}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                  "tooltip": "Used when resolution is custom."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                   "tooltip": "Used when resolution is custom."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            },
            "optional": {"vae": ("VAE", {"tooltip": "Only needed for pixel-space models (3 channels, no downscale)."})},
        }

    def generate(self, resolution, width, height, batch_size, vae=None):
        if resolution != CUSTOM:
            width, height = RESOLUTIONS[resolution]
        channels, downscale = 4, 8
        if vae is not None:
            channels, downscale = vae.latent_channels, vae.spacial_compression_encode()
        lat_h, lat_w = latent_size(width, height, downscale=downscale, patch=PATCH_SIZE)
        return {"samples": torch.zeros(batch_size, channels, lat_h, lat_w)}, width, height
