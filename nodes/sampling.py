"""HDM Sampler: the official uniform flow schedule and HDM's samplers, run through ComfyUI's sampling machinery
(progress bar, live previews, interruption, memory management)."""

from __future__ import annotations

SAMPLER_NAMES = ["euler", "heun", "dpmpp_2m"]  # keys of hdm_core.sampling.SAMPLERS; "euler" is the official one


class HDMSampler:
    DESCRIPTION = ("Sample an HDM model the official way: uniform flow schedule from t = 1 (optionally shifted), "
                   "CFG, every sample seeded with seed + its batch index. Euler reproduces the official pipeline; "
                   "denoise < 1 runs img2img on the input latent.")
    CATEGORY = "HDM/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An HDM model."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT", {"tooltip": "Empty latent (text-to-image) or an encoded image (img2img)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Sample i of the batch uses seed + i."}),
            "steps": ("INT", {"default": 32, "min": 1, "max": 1000}),
            "cfg": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (SAMPLER_NAMES, {"default": "euler"}),
            "shift": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 20.0, "step": 0.05,
                                "tooltip": "Schedule shift σ = s·t / (1 + (s − 1)·t); 1 = the official schedule."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text-to-image; lower keeps more of the input latent."}),
        }}

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, shift, denoise):
        from . import comfy_model

        return (comfy_model.hdm_sample(model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                       shift, denoise),)
