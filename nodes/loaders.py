"""Loader nodes: the released single file (HDM-ext compatible id and widget) and split files. The work is in
`loading.py`, imported inside each method (node files import without ComfyUI)."""

from __future__ import annotations


class HDMLoader:
    """Node id and widget are those of the official HDM-ext loader, so its shared workflows load unchanged."""

    DESCRIPTION = ("Load the released HDM single file (e.g. hdm-xut-340M-1024px-note.safetensors in models/"
                   "checkpoints): XUT diffusion model, Qwen3-0.6B text encoder and EQ-SDXL-VAE, built locally.")
    CATEGORY = "HDM/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The HDM diffusion model (works with KSampler and the other built-in sampling nodes).",
                       "The Qwen3-0.6B text encoder (works with CLIPTextEncode and HDM Text Encode).",
                       "The EQ-SDXL-VAE (works with VAEDecode / VAEEncode and their tiled variants).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from . import loading

        return {"required": {"ckpt_name": (loading.list_files("checkpoints"),
                                           {"tooltip": "The HDM checkpoint in models/checkpoints."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name):
        from . import loading

        return loading.missing_file_message("checkpoints", ckpt_name) or True

    def load(self, ckpt_name):
        from . import loading

        return loading.load_checkpoint(ckpt_name)


class HDMSplitLoader:
    DESCRIPTION = ("Load HDM from separate files: the XUT diffusion model (models/diffusion_models), Qwen3-0.6B "
                   "(models/text_encoders) and the EQ-SDXL-VAE (models/vae).")
    CATEGORY = "HDM/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = HDMLoader.OUTPUT_TOOLTIPS
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        from . import loading

        return {"required": {
            "unet_name": (loading.list_files("diffusion_models"),
                          {"tooltip": "XUT weights in models/diffusion_models."}),
            "clip_name": (loading.list_files("text_encoders"), {"tooltip": "Qwen3-0.6B in models/text_encoders."}),
            "vae_name": (loading.list_files("vae"), {"tooltip": "EQ-SDXL-VAE in models/vae."}),
            "weight_dtype": (loading.WEIGHT_DTYPES, {"tooltip": (
                "Diffusion-model weight dtype; default lets ComfyUI choose for the device. fp8_*: half the memory "
                "of fp16, each layer computed in fp16/bf16/fp32 where the device has no fp8 maths (fp8_e4m3fn_fast: "
                "fp8 matmuls on GPUs that have them, e.g. Ada / Hopper).")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name, clip_name, vae_name):
        from . import loading

        errors = [loading.missing_file_message(kind, name) for kind, name in
                  (("diffusion_models", unet_name), ("text_encoders", clip_name), ("vae", vae_name))]
        return " ".join(e for e in errors if e) or True

    def load(self, unet_name, clip_name, vae_name, weight_dtype="default"):
        from . import loading

        return loading.load_split(unet_name, clip_name, vae_name, weight_dtype)
