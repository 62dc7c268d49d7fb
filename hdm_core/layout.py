"""The one reader of HDM's file layouts (SPEC §8), as pure state-dict work: no files, no modules.

Released single file: `unet.model.*` (XUT, official names), `te.text_models.0.*` (Qwen3Model), `vae.*` (diffusers
AutoencoderKL) and `vae_mean` / `vae_std`; a pixel-space model stores the marker `vae.pixel_space_vae` (the key
ComfyUI uses to pick its pixel-space VAE). Our files also carry the XUT config as JSON metadata. Split files hold
one part each, under any of the prefixes below. `hdm_core.checkpoint` opens files and builds hdm_core modules from
these parts; the ComfyUI glue (`nodes/loading.py`) builds ComfyUI objects from the same parts.

ComfyUI's names for the same parts live here too, each prefix constant naming one string: `COMFY_UNET_PREFIX` (the
XUT in a checkpoint ComfyUI saved), `COMFY_TE_NAME` (its name for HDM's text encoder), and the prefixes of the
adapter keys ComfyUI's LoRA loader reads, `LORA_UNET_PREFIX` and `LORA_TE_PREFIX` (`hdm_core.adapters`).

`sd` may be any mapping (a lazy view of a file works): only the keys of the part asked for are read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .config import XUTConfig, infer_config
from .text_encoder import infer_qwen3_config
from .weights import CheckpointError

# The released single file.
UNET_PREFIX = "unet.model."
TE_PREFIX = "te.text_models.0."
VAE_PREFIX = "vae."
PIXEL_SPACE_KEY = "vae.pixel_space_vae"  # in a VAE-only file: "pixel_space_vae"
VAE_MEAN_KEY, VAE_STD_KEY = "vae_mean", "vae_std"  # per-channel latent statistics, (1, C, 1, 1)
STAT_KEYS = (VAE_MEAN_KEY, VAE_STD_KEY)
CONFIG_METADATA_KEY = "hdm.xut_config"
RELEASED_FILE = "hdm-xut-340M-1024px-note.safetensors"

# ComfyUI's names for the same parts.
COMFY_UNET_PREFIX = "model.diffusion_model."  # the XUT in a checkpoint ComfyUI saved
COMFY_TE_NAME = "qwen3_06b"  # ComfyUI's name for HDM's text encoder: its CLIP state-dict prefix and token-dict key
LORA_UNET_PREFIX = "diffusion_model."  # adapter keys for the XUT, as ComfyUI's LoRA loader reads them
COMFY_CLIP_PREFIX = f"{COMFY_TE_NAME}.transformer.model."  # the Qwen3Model in ComfyUI's CLIP state dict
LORA_TE_PREFIX = f"text_encoders.{COMFY_CLIP_PREFIX}"  # adapter keys for the text encoder (Qwen3Model)

# Where an XUT may sit: the released file, a ComfyUI-saved model, a diffusion-model-only file.
XUT_PREFIXES = (UNET_PREFIX, COMFY_UNET_PREFIX, "")
_XUT_MARKERS = ("in_patch.proj.weight", "ctx_proj.weight")
_TE_MARKER = "embed_tokens.weight"
_VAE_MARKER = "decoder.conv_in.weight"
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_QWEN3_LAYER_KEYS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                     "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.down_proj.weight")

# Tensor names of adapter files (ComfyUI / LyCORIS / kohya / PEFT), so an adapter given as a model says what it is.
_ADAPTER_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.weight", ".hada_w1_a",
                     ".lokr_w1", ".lokr_w1_a", ".w_norm", ".diff", ".dora_scale")
# Key fragments that identify checkpoints of other families, for a useful error message.
_OTHER_ARCHS = [
    (f"{COMFY_UNET_PREFIX}double_blocks.", "Flux"),
    ("double_blocks.0.img_attn.", "Flux"),
    (f"{COMFY_UNET_PREFIX}joint_blocks.", "SD3"),
    ("conditioner.embedders.1.", "SDXL"),
    (f"{COMFY_UNET_PREFIX}input_blocks.", "Stable Diffusion (UNet)"),
    (COMFY_UNET_PREFIX, "another ComfyUI diffusion model"),
    ("first_stage_model.", "an LDM checkpoint"),
]


@dataclass
class CheckpointParts:
    """A checkpoint split into its parts, each with bare keys; a part the file lacks is None."""

    xut: dict[str, torch.Tensor]
    xut_config: XUTConfig
    text_encoder: dict[str, torch.Tensor] | None = None
    text_encoder_config: dict | None = None  # Qwen3Config keyword arguments
    vae: dict[str, torch.Tensor] | None = None  # diffusers AutoencoderKL keys
    vae_mean: torch.Tensor | None = None
    vae_std: torch.Tensor | None = None
    pixel_space: bool = False


def describe_architecture(keys: Iterable[str]) -> str:
    """A short guess of what family a non-HDM checkpoint belongs to (or that it is an adapter, and how to use one)."""
    keys = list(keys)
    if any(k.endswith(_ADAPTER_SUFFIXES) or k.startswith("lycoris_") for k in keys):
        return ("an adapter (LoRA/LoHa/LoKr), not a model: apply it to its base model with --lora FILE:STRENGTH "
                "(python -m hdm_core.generate, python -m hdm_core.merge), ComfyUI's LoraLoaderModelOnly, or "
                "hdm_core.adapters.apply_adapters")
    for fragment, name in _OTHER_ARCHS:
        if any(k.startswith(fragment) for k in keys):
            return f"{name} (found keys starting with {fragment!r})"
    if any(k.startswith(("layers.0.self_attn.", "model.layers.0.self_attn.")) for k in keys):
        return "a text encoder only (Qwen/Llama-style keys)"
    if any(k.startswith(("decoder.up_blocks.", "decoder.up.")) for k in keys):
        return "a VAE only"
    return f"an unknown model (first keys: {keys[:5]})"


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: sd[k] for k in sd if k.startswith(prefix)}


def _shortest_prefix(keys: Iterable[str], marker: str) -> str | None:
    found = [k[:-len(marker)] for k in keys if k.endswith(marker)]
    return min(found, key=len) if found else None


# ---------------------------------------------------------------------------------------------------
# The three parts
# ---------------------------------------------------------------------------------------------------

def find_xut(keys: Iterable[str]) -> str | None:
    """The prefix of the XUT weights, or None when there are none."""
    keys = set(keys)
    return next((p for p in XUT_PREFIXES if all(p + m in keys for m in _XUT_MARKERS)), None)


def xut_part(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
             name: str = "checkpoint") -> tuple[dict[str, torch.Tensor], XUTConfig]:
    """Bare XUT weights and their config (from the metadata, else from the shapes)."""
    prefix = find_xut(sd)
    if prefix is None:
        raise CheckpointError(
            f"{name} is not an HDM/XUT checkpoint: it looks like {describe_architecture(sd)}. HDM files contain "
            f"'{UNET_PREFIX}in_patch.proj.weight' (the released single file, {RELEASED_FILE}) or "
            f"'in_patch.proj.weight' (a diffusion-model-only file)")
    xut = strip_prefix(sd, prefix)
    if not metadata or CONFIG_METADATA_KEY not in metadata:
        return xut, infer_config(xut)
    try:
        return xut, check_config(XUTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY])))
    except (ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"the XUT config in the metadata of {name} ('{CONFIG_METADATA_KEY}') is not usable "
                              f"({err}); fix it, or remove that key to infer the config from the weights") from err


# Bounds of the XUT config's sizes: far above any HDM model (XUT-large: dim 1280, 4 × (1 + 3) blocks), far below what
# overflows or takes minutes to build; block counts are the tighter bound (each block is a module).
MAX_WIDTH, MAX_BLOCKS = 1 << 16, 256
_BLOCK_FIELDS = ("depth", "enc_blocks", "dec_blocks", "prev_trns_depth", "post_trns_depth")
_MAY_BE_ZERO = ("addon_info_embs_dim", "prev_trns_depth", "post_trns_depth")


def check_config(config: XUTConfig) -> XUTConfig:
    """`config` once every size in it is a whole number in range (ValueError naming the first that is not)."""
    sizes = {**{k: v for k, v in config.to_dict().items() if k != "tread_config"}, **config.to_dict()["tread_config"]}
    for key, value in sizes.items():
        if key == "dropout_ratio":
            continue
        low, high = 0 if key in _MAY_BE_ZERO else 1, MAX_BLOCKS if key in _BLOCK_FIELDS else MAX_WIDTH
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{key} {value!r} must be a whole number in [{low}, {high}]")
    return config


def find_text_encoder(keys: Iterable[str]) -> str | None:
    """The prefix of the Qwen3 weights (`te.text_models.0.`, `model.`, a ComfyUI prefix, or ''), or None."""
    return _shortest_prefix(keys, _TE_MARKER)


def text_encoder_part(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Bare, complete Qwen3Model weights and their Qwen3Config arguments; anything else (lm_head) is dropped."""
    prefix = find_text_encoder(sd)
    if prefix is None:
        raise CheckpointError(
            f"{name} contains no text-encoder weights (no '*{_TE_MARKER}'; it looks like "
            f"{describe_architecture(sd)}); HDM needs Qwen3-0.6B: the released single file {RELEASED_FILE} "
            f"includes it, or pass a Qwen3-0.6B .safetensors as the text encoder")
    if prefix + "layers.0.self_attn.q_norm.weight" not in sd:
        raise CheckpointError(f"the text encoder in {name} is not Qwen3 (no q_norm weights under '{prefix}'); "
                              f"HDM needs Qwen3-0.6B")
    te = strip_prefix(sd, prefix)
    config = infer_qwen3_config(te)
    expected = [_TE_MARKER, "norm.weight"] + [f"layers.{i}.{k}" for i in range(config["num_hidden_layers"])
                                              for k in _QWEN3_LAYER_KEYS]
    missing = [k for k in expected if k not in te]
    if missing:
        raise CheckpointError(f"the Qwen3 text encoder in {name} is incomplete: {len(missing)} missing tensors "
                              f"{missing[:4]}; the file is damaged: download or copy it again")
    return {k: te[k] for k in expected}, config


def is_pixel_space(keys: Iterable[str]) -> bool:
    """Whether the file marks a pixel-space model (no VAE: the latent is the image)."""
    return any(k in (PIXEL_SPACE_KEY, "pixel_space_vae") for k in keys)


def find_vae(keys: Iterable[str]) -> str | None:
    """The prefix of the VAE weights (`vae.`, `first_stage_model.`, ''), or None."""
    return _shortest_prefix(keys, _VAE_MARKER)


def vae_part(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Bare VAE weights (encoder / decoder / quant convs, in the naming the file uses)."""
    prefix = find_vae(sd)
    if prefix is None:
        raise CheckpointError(
            f"{name} contains no VAE weights (no '*{_VAE_MARKER}'; first keys are {list(sd)[:5]}); HDM uses the "
            f"EQ-SDXL-VAE: the released single file {RELEASED_FILE} includes it, or pass the VAE .safetensors")
    return {k: v for k, v in strip_prefix(sd, prefix).items() if k.startswith(_VAE_ROOTS)}


def vae_stats(sd: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The file's per-channel latent mean and std (None where absent: the EQ-VAE defaults apply)."""
    mean, std = (sd[k] if k in sd else None for k in STAT_KEYS)
    return mean, std


def split_checkpoint(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                     name: str = "checkpoint") -> CheckpointParts:
    """Every part of a single-file checkpoint (a diffusion-model-only file gives an XUT and no other part)."""
    xut, config = xut_part(sd, metadata, name)
    parts = CheckpointParts(xut, config)
    if find_text_encoder(sd) is not None:
        parts.text_encoder, parts.text_encoder_config = text_encoder_part(sd, name)
    parts.pixel_space = is_pixel_space(sd) or (config.input_dim == 3 and find_vae(sd) is None)
    if not parts.pixel_space and find_vae(sd) is not None:
        parts.vae = vae_part(sd, name)
    parts.vae_mean, parts.vae_std = vae_stats(sd)
    return parts
