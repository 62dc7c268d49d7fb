"""HDM node pack (classic V1 node API). Node ids are permanent: HDMLoader, HDMCameraParam and HDMTreadGamma keep
the ids, inputs and widget order of the official HDM-ext pack, so workflows shared for it run unchanged.

Two kinds of file:
* node files (loaders, conditioning, latent, sampling): the node classes; they import without ComfyUI (tests use
  them so), importing ComfyUI and the glue inside the methods that run in ComfyUI;
* glue (model: latent formats and model classes, text_encoder: the Qwen3 CLIP classes, loading: files to
  MODEL / CLIP / VAE): imports ComfyUI at the top, never imported by a node file at module level.
"""

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
