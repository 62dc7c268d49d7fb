"""HDM Sampler and HDM Empty Latent: a new image's starting point and the sampler (node shells: the work is in
sampling.py and latent.py)."""

from __future__ import annotations

from ..hdm_core.sampling import SAMPLERS
from .latent import CUSTOM, DEFAULT_RESOLUTION, MAX_BATCH, RESOLUTIONS, empty_latent
from .sampling import hdm_sample
from .schema import io, node_schema

SEED_MAX = 0xFFFFFFFFFFFFFFFF
SIZE = {"default": 1024, "min": 16, "max": 8192, "step": 16}


class HDMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMSampler", display_name="HDM Sampler", category="HDM/sampling",
            search_aliases=("hdm ksampler", "sample hdm", "official sampler"),
            description=(
                "Draws an HDM image the way the official app does: its step schedule, classifier-free guidance, "
                "and one seed per image (image i of a batch uses seed + i, so an image does not depend on the "
                "batch it is in). Official settings: euler, 32 steps, CFG 3. Shows a live preview; stop it with "
                "Cancel. KSampler works on HDM too, with ComfyUI's rounded copy of the schedule."),
            inputs=[
                io.Model.Input("model", tooltip="The HDM model from an HDM loader (through LoRA loaders if you like)."),
                io.Conditioning.Input("positive", tooltip="What to draw: from HDM Text Encode, through HDM Camera / "
                                                          "HDM Tread Gamma if you use them."),
                io.Conditioning.Input("negative", tooltip="What to avoid: the negative prompt's conditioning."),
                io.Latent.Input("latent_image", tooltip=(
                    "HDM Empty Latent for a new image, or a VAE-encoded picture for img2img (then lower denoise).")),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True, tooltip=(
                    "The random start of the image. Image i of a batch uses seed + i: image 2 of a batch at seed "
                    "10 is the single image of seed 12.")),
                io.Int.Input("steps", default=32, min=1, max=1000, tooltip=(
                    "How many denoising steps. Official: 32; 20 to 40 is the useful range, fewer is faster but "
                    "rougher.")),
                io.Float.Input("cfg", default=3.0, min=0.0, max=30.0, step=0.1, round=0.01, tooltip=(
                    "How closely the image follows the prompt rather than the negative prompt. Official: 3; 2 to 6 "
                    "is the useful range; 1 turns guidance off (twice as fast, the negative prompt is ignored).")),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler", tooltip=(
                    "euler reproduces the official app. heun calls the model twice per step (slower, smoother); "
                    "dpmpp_2m gets clean results in fewer steps.")),
                io.Float.Input("shift", default=1.0, min=0.1, max=20.0, step=0.05, tooltip=(
                    "Above 1 spends more of the steps on the overall layout (high noise), below 1 on fine detail: "
                    "sigma = s·t / (1 + (s − 1)·t). Official: 1.")),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "1 draws a new image from noise. Below 1 keeps part of the input picture (img2img, hires fix): "
                    "0.3 to 0.6 refines it, lower values change less.")),
            ],
            outputs=[io.Latent.Output(tooltip="The finished latent: connect it to VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, shift,
                denoise) -> io.NodeOutput:
        return io.NodeOutput(hdm_sample(model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                                        shift, denoise))


class HDMEmptyLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMEmptyLatent", display_name="HDM Empty Latent (resolution)", category="HDM/latent",
            search_aliases=("hdm resolution", "hdm empty latent", "image size"),
            description=(
                "The blank start of a new HDM image, at a size HDM was trained for: about one megapixel in the "
                "common aspect ratios (1344x896 is the official example's), or any custom size in steps of 16 px. "
                "Connect the loader's VAE when you use a pixel-space HDM model such as the CPU demo model."),
            inputs=[
                io.Combo.Input("resolution", options=[*RESOLUTIONS, CUSTOM], default=DEFAULT_RESOLUTION, tooltip=(
                    "The image size. Pick 'custom' to use width and height below.")),
                io.Int.Input("width", **SIZE, tooltip=(
                    "Width in pixels when resolution is 'custom', a multiple of 16. HDM works best near one "
                    "megapixel (width x height around 1,000,000).")),
                io.Int.Input("height", **SIZE, tooltip=(
                    "Height in pixels when resolution is 'custom', a multiple of 16. HDM works best near one "
                    "megapixel (width x height around 1,000,000).")),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip=(
                    f"How many images to make at once, 1 to {MAX_BATCH}. With HDM Sampler image i uses seed + i.")),
                io.Vae.Input("vae", optional=True, tooltip=(
                    "Optional: the loader's VAE. Only needed for pixel-space HDM models (like the CPU demo model), "
                    "so the latent gets their shape; the released model does not need it.")),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The empty latent: connect it to a sampler."),
                     io.Int.Output(display_name="width", tooltip="The image width in pixels."),
                     io.Int.Output(display_name="height", tooltip="The image height in pixels.")],
        )

    @classmethod
    def execute(cls, resolution, width, height, batch_size, vae=None) -> io.NodeOutput:
        return io.NodeOutput(*empty_latent(resolution, width, height, batch_size, vae))
