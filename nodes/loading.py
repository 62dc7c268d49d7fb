"""Loading HDM files in ComfyUI (ComfyUI glue: imports ComfyUI at the top).

`hdm_core.layout` reads the parts out of a file; this module only finds files in ComfyUI's model folders, adds
to every error where in ComfyUI each file belongs, and builds ComfyUI's MODEL, CLIP and VAE from the parts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths
import torch

from ..hdm_core.config import XUTConfig
from ..hdm_core.layout import (
    COMFY_CLIP_PREFIX,
    RELEASED_FILE,
    TE_PREFIX,
    VAE_MEAN_KEY,
    VAE_PREFIX,
    CheckpointError,
    is_pixel_space,
    split_checkpoint,
    text_encoder_part,
    vae_part,
    vae_stats,
    xut_part,
)
from ..hdm_core.weights import DTYPES, check_finite, check_weights
from .model import HDMEQVAE, HDMModelConfig, HDMPixelSpace
from .text_encoder import text_encoder_class, tokenizer_class

# ComfyUI's fp8 weight dtypes, as its UNETLoader spells them: (storage dtype, fp8 matmuls where the device has them).
# Where it cannot compute in fp8 (CPU, GPUs before Ada), ComfyUI's manual cast runs each layer in fp16/bf16/fp32.
FP8_DTYPES = {"fp8_e4m3fn": (torch.float8_e4m3fn, False), "fp8_e4m3fn_fast": (torch.float8_e4m3fn, True),
              "fp8_e5m2": (torch.float8_e5m2, False)}
WEIGHT_DTYPES = ["default", *DTYPES, *FP8_DTYPES]  # "default": ComfyUI picks the dtype for the device
PIXEL_SPACE_VAE = {"pixel_space_vae": torch.tensor(1.0)}  # what comfy.sd.VAE builds its pixel-space VAE from
# What belongs in each model folder, for messages.
FOLDER_CONTENT = {"checkpoints": f"the HDM single file (e.g. {RELEASED_FILE})",
                  "diffusion_models": "an HDM diffusion-model file (XUT weights)",
                  "text_encoders": "a Qwen3-0.6B text encoder (.safetensors)",
                  "vae": "the EQ-SDXL-VAE (.safetensors)"}
WHERE_FILES_GO = (f"In ComfyUI the released single file ({RELEASED_FILE}) goes in models/checkpoints and loads "
                  f"with HDM Checkpoint Loader; split files go in models/diffusion_models, models/text_encoders and "
                  f"models/vae and load with HDM Split Loader. For other model families use ComfyUI's own loaders.")


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def list_files(kind: str) -> list[str]:
    return folder_paths.get_filename_list(kind)


def missing_file_message(kind: str, name: str) -> str | None:
    """None if `name` exists in the `kind` model folders, else a message naming the folders to use."""
    if not isinstance(name, str) or folder_paths.get_full_path(kind, name) is not None:  # linked: checked later
        return None
    roots = folder_paths.get_folder_paths(kind)
    return (f"{kind} file '{name}' not found. Put {FOLDER_CONTENT.get(kind, 'the file')} into models/{kind} "
            f"(searched: {', '.join(roots)}) and press 'r' in the UI to refresh the list.")


def read_file(kind: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    message = missing_file_message(kind, name)
    if message:
        raise FileNotFoundError(message)
    sd, metadata = comfy.utils.load_torch_file(folder_paths.get_full_path(kind, name), safe_load=True,
                                               return_metadata=True)
    return sd, metadata or {}


def read_part(read: Callable[..., Any], name: str, *args: Any) -> Any:
    """A hdm_core.layout reader applied to file `name`; its errors also say where files go in ComfyUI."""
    try:
        return read(*args, name=f"'{name}'")
    except CheckpointError as err:
        raise CheckpointError(f"{err}. {WHERE_FILES_GO}") from err


# ---------------------------------------------------------------------------------------------------
# Building MODEL / CLIP / VAE
# ---------------------------------------------------------------------------------------------------

def model_options(weight_dtype: str) -> dict:
    """A weight-dtype widget value as ComfyUI's model_options ({"dtype", "fp8_optimizations"}, as UNETLoader)."""
    if weight_dtype in FP8_DTYPES:
        dtype, fast = FP8_DTYPES[weight_dtype]
        return {"dtype": dtype, "fp8_optimizations": fast}
    return {"dtype": DTYPES.get(weight_dtype)}


def build_model(xut_sd: Mapping[str, torch.Tensor], config: XUTConfig, latent_format: Any, *,
                options: dict | None = None, te_config: dict | None = None) -> Any:
    """A ModelPatcher around HDMModel, with ComfyUI's dtype selection (or options["dtype"]), manual cast and
    initial placement; options["fp8_optimizations"]: fp8 matmuls on devices that support them."""
    options = options or {}
    model_config = HDMModelConfig(config, latent_format=latent_format, te_config=te_config)
    model_config.optimizations["fp8"] = bool(options.get("fp8_optimizations"))
    dtype = options.get("dtype")
    parameters = comfy.utils.calculate_parameters(xut_sd)
    load_device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=model_config.supported_inference_dtypes,
                              weight_dtype=comfy.utils.weight_dtype(xut_sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                 model_config.supported_inference_dtypes))
    initial_device = mm.unet_inital_load_device(parameters, dtype)
    model = model_config.get_model(device=initial_device)
    check_weights(model.diffusion_model.state_dict(), xut_sd,
                  what=f"HDM weights do not match their config {config.to_dict()} (the file is damaged or of an "
                       f"unsupported variant)")
    check_finite(xut_sd, what="HDM diffusion-model weights")
    model.load_model_weights(dict(xut_sd), "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    if initial_device != torch.device("cpu"):
        mm.load_models_gpu([patcher], force_full_load=True)
    return patcher


def build_clip(te_sd: Mapping[str, torch.Tensor], config: dict, model_options: dict | None = None) -> Any:
    check_finite(te_sd, what="Qwen3 text-encoder weights")
    clip_sd = {COMFY_CLIP_PREFIX + k: v for k, v in te_sd.items()}
    target = comfy.supported_models_base.ClipTarget(tokenizer_class(config), text_encoder_class(config))
    return comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=comfy.utils.calculate_parameters(clip_sd), state_dict=clip_sd,
                         model_options=model_options or {})


def build_vae(vae_sd: Mapping[str, torch.Tensor] | None, metadata: dict | None = None) -> Any:
    """ComfyUI's VAE from bare VAE weights, or its pixel-space VAE for None."""
    vae = comfy.sd.VAE(sd=dict(vae_sd) if vae_sd is not None else dict(PIXEL_SPACE_VAE), metadata=metadata)
    vae.throw_exception_if_invalid()
    return vae


def latent_format(config: XUTConfig, pixel_space: bool, mean: torch.Tensor | None, std: torch.Tensor | None) -> Any:
    return HDMPixelSpace() if pixel_space or config.input_dim == 3 else HDMEQVAE(mean, std)


# ---------------------------------------------------------------------------------------------------
# The loader nodes' work
# ---------------------------------------------------------------------------------------------------

def load_checkpoint(ckpt_name: str) -> tuple[Any, Any, Any]:
    """MODEL, CLIP, VAE from the released single-file checkpoint in models/checkpoints."""
    sd, metadata = read_file("checkpoints", ckpt_name)
    parts = read_part(split_checkpoint, ckpt_name, sd, metadata)
    if parts.text_encoder is None:
        raise CheckpointError(
            f"'{ckpt_name}' has the HDM diffusion model but no text-encoder weights ('{TE_PREFIX}*'). Use HDM Split "
            f"Loader: put this file in models/diffusion_models, Qwen3-0.6B in models/text_encoders and the "
            f"EQ-SDXL-VAE in models/vae.")
    if parts.vae is None and not parts.pixel_space:
        raise CheckpointError(
            f"'{ckpt_name}' has no VAE weights ('{VAE_PREFIX}*'). Use HDM Split Loader with the EQ-SDXL-VAE in "
            f"models/vae (or ComfyUI's Load VAE node next to this loader).")
    model = build_model(parts.xut, parts.xut_config,
                        latent_format(parts.xut_config, parts.pixel_space, parts.vae_mean, parts.vae_std),
                        te_config=parts.text_encoder_config)
    return model, build_clip(parts.text_encoder, parts.text_encoder_config), build_vae(parts.vae, metadata)


def load_split(unet_name: str, clip_name: str, vae_name: str, weight_dtype: str = "default") -> tuple[Any, Any, Any]:
    """MODEL, CLIP, VAE from diffusion_models/, text_encoders/ and vae/ files."""
    sd, metadata = read_file("diffusion_models", unet_name)
    xut_sd, config = read_part(xut_part, unet_name, sd, metadata)
    te_sd, te_config = read_part(text_encoder_part, clip_name, read_file("text_encoders", clip_name)[0])
    vae_file, vae_metadata = read_file("vae", vae_name)
    pixel = is_pixel_space(vae_file)
    vae_sd = None if pixel else read_part(vae_part, vae_name, vae_file)
    mean, std = vae_stats(vae_file if VAE_MEAN_KEY in vae_file else sd)
    model = build_model(xut_sd, config, latent_format(config, pixel, mean, std),
                        options=model_options(weight_dtype), te_config=te_config)
    return model, build_clip(te_sd, te_config), build_vae(vae_sd, vae_metadata)
