"""HDM node pack, in ComfyUI's node schema (one ComfyExtension; `comfy_entrypoint` is what ComfyUI calls).

Node ids are permanent: HDMLoader, HDMCameraParam and HDMTreadGamma keep the ids, inputs and widget order of the
official HDM-ext pack, so workflows shared for it run unchanged; the others keep those of this pack's first release.

Three kinds of file:
* node logic (conditioning, latent, sampling): what the nodes do, as plain functions; they import without
  ComfyUI (the unit tests use them so), importing ComfyUI inside the functions that need it;
* node shells (*_nodes.py, schema.py, extension.py): the schemas (inputs, tooltips, descriptions) and `execute`
  calls into the logic; they import comfy_api at the top and are imported only by `comfy_entrypoint`;
* glue (model: latent formats and model classes, text_encoder: the Qwen3 CLIP classes, loading: files to
  MODEL / CLIP / VAE, positions: each model call's place on the canvas): imports ComfyUI at the top, never
  imported by a node-logic file at module level.
"""

NODE_IDS = ("HDMLoader", "HDMSplitLoader", "HDMTextEncode", "HDMCameraParam", "HDMTreadGamma", "HDMSampler",
            "HDMCameraSweep", "HDMEmptyLatent", "HDMTiledDiffusion", "HDMAreaPositions")


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack's ComfyExtension (its node shells are imported here, inside ComfyUI)."""
    from .extension import HDMExtension

    return HDMExtension()
