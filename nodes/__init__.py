"""HDM node pack (classic V1 node API). Node ids are permanent: HDMLoader, HDMCameraParam and HDMTreadGamma keep
the ids, inputs and widget order of the official HDM-ext pack, so workflows shared for it run unchanged."""

import sys

if "comfy.model_management" in sys.modules:  # inside ComfyUI: fail at startup (IMPORT FAILED), not on first use
    from . import comfy_model  # noqa: F401

from .conditioning import HDMCameraParam, HDMCameraSweep, HDMTextEncode, HDMTreadGamma
from .latent import HDMEmptyLatent
from .loaders import HDMLoader, HDMSplitLoader
from .sampling import HDMSampler

NODE_CLASS_MAPPINGS = {
    "HDMLoader": HDMLoader,
    "HDMSplitLoader": HDMSplitLoader,
    "HDMTextEncode": HDMTextEncode,
    "HDMCameraParam": HDMCameraParam,
    "HDMTreadGamma": HDMTreadGamma,
    "HDMSampler": HDMSampler,
    "HDMCameraSweep": HDMCameraSweep,
    "HDMEmptyLatent": HDMEmptyLatent,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "HDMLoader": "HDM Checkpoint Loader",
    "HDMSplitLoader": "HDM Split Loader (model / Qwen3 / VAE)",
    "HDMTextEncode": "HDM Text Encode",
    "HDMCameraParam": "HDM Camera",
    "HDMTreadGamma": "HDM Tread Gamma",
    "HDMSampler": "HDM Sampler",
    "HDMCameraSweep": "HDM Camera Sweep",
    "HDMEmptyLatent": "HDM Empty Latent (resolution)",
}
