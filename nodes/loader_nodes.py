"""The loader nodes (node shells: the work is in loading.py). HDMLoader keeps the id and widget of the official
HDM-ext loader, so its shared workflows load unchanged."""

from __future__ import annotations

from . import loading
from .schema import io, node_schema

CATEGORY = "HDM/loaders"
REFRESH = "Press r in the ComfyUI window after adding a file."


def loader_outputs() -> list[io.Output]:
    return [
        io.Model.Output(tooltip="The HDM image model: connect it to HDM Sampler or KSampler (through LoRA loaders if "
                                "you like), or to Train LoRA."),
        io.Clip.Output(tooltip="HDM's Qwen3 text encoder: connect it to HDM Text Encode (or CLIP Text Encode)."),
        io.Vae.Output(tooltip="HDM's VAE: VAE Decode turns the sampled latent into a picture, VAE Encode turns a "
                              "picture into a latent for img2img."),
    ]


class HDMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMLoader", display_name="HDM Checkpoint Loader", category=CATEGORY,
            search_aliases=("load hdm", "hdm checkpoint", "xut"),
            description=(
                "Loads an HDM model file from models/checkpoints, such as the released "
                "hdm-xut-340M-1024px-note.safetensors, and gives the three parts every HDM workflow needs: the image "
                "model, its Qwen3 text encoder and its VAE. Nothing is downloaded. Same node as in the official "
                "HDM-ext pack, so workflows made for it open unchanged."),
            inputs=[io.Combo.Input("ckpt_name", options=loading.list_files("checkpoints"), tooltip=(
                "The HDM file in models/checkpoints: the released single file, or one saved from an HDM model by "
                "Checkpoint Save. " + REFRESH))],
            outputs=loader_outputs(),
        )

    @classmethod
    def validate_inputs(cls, ckpt_name) -> bool | str:
        return loading.missing_file_message("checkpoints", ckpt_name) or True

    @classmethod
    def execute(cls, ckpt_name) -> io.NodeOutput:
        return io.NodeOutput(*loading.load_checkpoint(ckpt_name))


class HDMSplitLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMSplitLoader", display_name="HDM Split Loader (model / Qwen3 / VAE)", category=CATEGORY,
            search_aliases=("load hdm parts", "hdm unet loader", "hdm fp8"),
            description=(
                "Loads HDM from three separate files: the image model (models/diffusion_models), the Qwen3-0.6B "
                "text encoder (models/text_encoders) and the EQ-SDXL VAE (models/vae). Use it when the parts come "
                "as separate downloads, or to store the image model in less memory (weight_dtype)."),
            inputs=[
                io.Combo.Input("unet_name", options=loading.list_files("diffusion_models"), tooltip=(
                    "The HDM image model (XUT weights) in models/diffusion_models. " + REFRESH)),
                io.Combo.Input("clip_name", options=loading.list_files("text_encoders"), tooltip=(
                    "The Qwen3-0.6B text encoder in models/text_encoders. " + REFRESH)),
                io.Combo.Input("vae_name", options=loading.list_files("vae"), tooltip=(
                    "The EQ-SDXL VAE in models/vae. " + REFRESH)),
                io.Combo.Input("weight_dtype", options=loading.WEIGHT_DTYPES, tooltip=(
                    "How the image model is stored. default: ComfyUI picks for your device (fp16 on most GPUs, "
                    "fp32 on CPU). fp8_*: half the memory of fp16, images change slightly; each layer still "
                    "computes in fp16/bf16/fp32 unless the GPU has fp8 maths (fp8_e4m3fn_fast: Ada / Hopper)."))
            ],
            outputs=loader_outputs(),
        )

    @classmethod
    def validate_inputs(cls, unet_name, clip_name, vae_name) -> bool | str:
        errors = [loading.missing_file_message(kind, name) for kind, name in
                  (("diffusion_models", unet_name), ("text_encoders", clip_name), ("vae", vae_name))]
        return " ".join(e for e in errors if e) or True

    @classmethod
    def execute(cls, unet_name, clip_name, vae_name, weight_dtype="default") -> io.NodeOutput:
        return io.NodeOutput(*loading.load_split(unet_name, clip_name, vae_name, weight_dtype))
