"""The only place that touches ComfyUI internals: HDM as a native ComfyUI model.

* `HDMEQVAE` / `HDMPixelSpace`: latent formats (EQ-VAE mean/std normalisation with preview factors).
* `HDMModelConfig` (a `supported_models_base.BASE`) and `HDMModel` (a `model_base.BaseModel`, model type FLOW,
  multiplier 1.0, so the network gets t = σ): built-in KSampler, SamplerCustomAdvanced, ModelSamplingAuraFlow
  and the model-merge nodes work on it unchanged.
* The text context is a `CONDRegular`, not a `CONDCrossAttn`: ComfyUI never repeats a shorter cond/uncond
  context into a longer one (HDM's text tokens join self-attention, SPEC §10); contexts of different lengths
  simply run as separate model calls.
* The Qwen3-0.6B text encoder is ComfyUI's own `Llama2_` with a config read from the weights (any size).
* Loading (single file and split files) with messages that say what was found and which file goes where,
  and `hdm_sample`, the HDM Sampler: official uniform flow schedule + hdm_core samplers inside ComfyUI's
  sampling machinery (progress bar, previews, interruption, memory management).
"""

from __future__ import annotations

import json
from typing import Any

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.supported_models_base
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy import sd1_clip
from comfy.text_encoders import llama
from transformers import Qwen2Tokenizer

from ..hdm_core.checkpoint import (
    CONFIG_METADATA_KEY,
    PIXEL_SPACE_KEY,
    TE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
    describe_architecture,
)
from ..hdm_core.config import XUTConfig, infer_config
from ..hdm_core.pipeline import seeded_noise
from ..hdm_core.rope import aspect_info, camera_pos, make_axial_pos
from ..hdm_core.sampling import SAMPLERS, flow_sigmas
from ..hdm_core.text_encoder import PAD_TOKEN_ID, TOKENIZER_DIR
from ..hdm_core.vae import EQVAE_MEAN, EQVAE_STD
from ..hdm_core.xut import XUT

RELEASED_FILE = "hdm-xut-340M-1024px-note.safetensors"
TE_NAME = "qwen3_06b"  # CLIP state-dict prefix: qwen3_06b.transformer.model.<Qwen3Model keys>
CAMERA_KEYS = ("x_shift", "y_shift", "zoom")
CAMERA_DEFAULTS = {"x_shift": 0.0, "y_shift": 0.0, "zoom": 1.0}
DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DM_PREFIXES = (UNET_PREFIX, "model.diffusion_model.", "")

# ---------------------------------------------------------------------------------------------------
# Latent formats
# ---------------------------------------------------------------------------------------------------

# ComfyUI's SDXL preview factors act on 0.13025·z. EQ-SDXL-VAE is a fine-tune of the SDXL VAE, so we reuse
# them, re-expressed for HDM's normalised latent x = (z − μ)/σ:  rgb = Σ_c f_c·0.13025·(σ_c·x_c + μ_c) + b.
# An approximation (no EQ-VAE weights were available to fit factors by least squares); see docs/comfyui.md.
_SDXL_SCALE = 0.13025
_SDXL_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
             (-0.3165, -0.2492, -0.2188))
_SDXL_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def eqvae_preview_factors(mean, std) -> tuple[list[list[float]], list[float]]:
    """Latent2RGB factors [4][3] and bias [3] for normalised EQ-VAE latents, derived from SDXL's."""
    factors = [[f * _SDXL_SCALE * s for f in row] for row, s in zip(_SDXL_RGB, std)]
    bias = [b + sum(_SDXL_SCALE * m * row[k] for row, m in zip(_SDXL_RGB, mean)) for k, b in enumerate(_SDXL_RGB_BIAS)]
    return factors, bias


class HDMEQVAE(comfy.latent_formats.LatentFormat):
    """EQ-SDXL-VAE latents, normalised per channel: model space x = (z − mean) / std (SPEC §7)."""

    latent_channels = 4

    def __init__(self, mean=EQVAE_MEAN, std=EQVAE_STD):
        self.latents_mean = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
        self.latents_std = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
        self.latent_rgb_factors, self.latent_rgb_factors_bias = eqvae_preview_factors(
            self.latents_mean.flatten().tolist(), self.latents_std.flatten().tolist())

    def process_in(self, latent):
        return (latent - self.latents_mean.to(latent)) / self.latents_std.to(latent)

    def process_out(self, latent):
        return latent * self.latents_std.to(latent) + self.latents_mean.to(latent)


class HDMPixelSpace(comfy.latent_formats.LatentFormat):
    """Pixel-space HDM models: the latent is the RGB image in [−1, 1]."""

    latent_channels = 3

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]

    def process_in(self, latent):
        return latent

    def process_out(self, latent):
        return latent


# ---------------------------------------------------------------------------------------------------
# Diffusion model
# ---------------------------------------------------------------------------------------------------

class HDMDiffusionModel(XUT):
    """XUT with ComfyUI's calling convention; same state-dict keys as the official model."""

    def __init__(self, xut_config: dict, image_model: str = "hdm_xut", dtype=None, device=None, operations=None):
        super().__init__(XUTConfig.from_dict(xut_config), ops=operations or torch.nn, dtype=dtype, device=device)
        self.dtype = dtype  # read by BaseModel.get_dtype()

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, x_shift=None,
                y_shift=None, zoom=None, tread_gamma=0.0, **kwargs):
        if context is not None and context.shape[-1] != self.config.ctx_dim:
            raise ValueError(
                f"the conditioning has {context.shape[-1]} features per token but this HDM model expects "
                f"{self.config.ctx_dim}: encode prompts with the CLIP output of an HDM loader")
        b, _, height, width = x.shape
        pos_map = None
        if x_shift is not None:  # camera node present: latent-resolution camera map (SPEC §4.3)
            pos = make_axial_pos(height, width, device=x.device)
            pos_map = camera_pos(pos, x_shift.float().reshape(-1), y_shift.float().reshape(-1),
                                 zoom.float().reshape(-1))                               # (B, H·W, 2)
        aspect = torch.full((b,), aspect_info(height, width), device=x.device)
        # HDM-ext / the official loop give the model t in its dtype (fp16: t is rounded before ×1000).
        return super().forward(x, timesteps.to(x.dtype), context, pos_map=pos_map, aspect=aspect,
                               tread_rate=float(tread_gamma) or None)


class HDMModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device,
                         unet_model=HDMDiffusionModel)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:  # never repeat-padded against a context of another length
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        camera = camera_tensors(kwargs)
        for name, value in (camera or {}).items():
            out[name] = comfy.conds.CONDRegular(value)
        # One TREAD rate per model call: conds with different gammas are never batched together.
        out["tread_gamma"] = comfy.conds.CONDConstant(float(kwargs.get("tread_gamma") or 0.0))
        return out


def camera_tensors(cond: dict) -> dict[str, torch.Tensor] | None:
    """x_shift / y_shift / zoom of a conditioning dict as float32 [F] tensors (None when no camera is set)."""
    if not any(k in cond for k in CAMERA_KEYS):
        return None
    values = [torch.as_tensor(cond.get(k, CAMERA_DEFAULTS[k]), dtype=torch.float32).reshape(-1) for k in CAMERA_KEYS]
    frames = max(v.numel() for v in values)
    return {k: v.expand(frames) if v.numel() == 1 else v for k, v in zip(CAMERA_KEYS, values)}


class HDMModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "hdm_xut"}
    unet_extra_config = {}
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}
    latent_format = HDMEQVAE
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    memory_usage_factor = 1.2
    vae_key_prefix = [VAE_PREFIX]
    text_encoder_key_prefix = [TE_PREFIX]

    def __init__(self, xut_config: XUTConfig, latent_format=None, te_config: dict | None = None):
        super().__init__({"image_model": "hdm_xut", "xut_config": xut_config.to_dict()})
        if latent_format is not None:
            self.latent_format = latent_format
        self.te_config = te_config

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.FLOW

    def get_model(self, state_dict=None, prefix="", device=None):
        return HDMModel(self, device=device)

    def clip_target(self, state_dict=None):
        if self.te_config is None:
            return None
        return comfy.supported_models_base.ClipTarget(tokenizer_class(self.te_config),
                                                      text_encoder_class(self.te_config))

    # CheckpointSave writes the released single-file layout, so HDM loaders read merged models back.
    def process_unet_state_dict_for_saving(self, state_dict):
        return comfy.utils.state_dict_prefix_replace(state_dict, {"": UNET_PREFIX})

    def process_clip_state_dict_for_saving(self, state_dict):
        prefix = f"{TE_NAME}.transformer.model."
        return {TE_PREFIX + k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def process_vae_state_dict_for_saving(self, state_dict):
        out = comfy.utils.state_dict_prefix_replace(state_dict, {"": VAE_PREFIX})
        if isinstance(self.latent_format, HDMEQVAE):
            out["vae_mean"], out["vae_std"] = self.latent_format.latents_mean, self.latent_format.latents_std
        return out


# ---------------------------------------------------------------------------------------------------
# Text encoder: ComfyUI's Qwen3 (Llama2_ with q/k norms) at the size found in the weights
# ---------------------------------------------------------------------------------------------------

_QWEN3_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta")
_QWEN3_LAYER_KEYS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                     "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.down_proj.weight")


def qwen3_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Qwen3 config from the shapes of a bare Qwen3Model state dict (Qwen3-0.6B or a tiny test model)."""
    vocab, hidden = sd["embed_tokens.weight"].shape
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    return {"vocab_size": int(vocab), "hidden_size": int(hidden),
            "intermediate_size": int(sd["layers.0.mlp.gate_proj.weight"].shape[0]), "num_hidden_layers": layers,
            "num_attention_heads": int(sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim),
            "num_key_value_heads": int(sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim),
            "head_dim": int(head_dim), "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6}


class HDMQwen3(llama.BaseLlama, torch.nn.Module):
    def __init__(self, config_dict, dtype, device, operations):
        super().__init__()
        config = llama.Qwen3_4BConfig(**{k: config_dict[k] for k in _QWEN3_FIELDS if k in config_dict})
        config.head_dim = config_dict.get("head_dim", 128)
        self.num_layers = config.num_hidden_layers
        self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
        self.dtype = dtype


def text_encoder_class(config: dict):
    """SD1ClipModel subclass for this Qwen3 size: final-norm hidden states, no attention mask (SPEC §6)."""

    class HDMQwen3Encoder(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, layer="last", layer_idx=None, textmodel_json_config=dict(config),
                             dtype=dtype, special_tokens={"pad": PAD_TOKEN_ID}, layer_norm_hidden_state=False,
                             model_class=HDMQwen3, enable_attention_masks=False, return_attention_masks=False,
                             model_options=model_options or {})

    class HDMTextEncoder(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, dtype=dtype, name=TE_NAME, clip_model=HDMQwen3Encoder,
                             model_options=model_options or {})

    return HDMTextEncoder


def tokenizer_class(config: dict):
    """Qwen3 tokenizer as HDM-ext feeds it: no BOS/EOS, no padding or truncation, "" → one pad token."""
    hidden = config["hidden_size"]

    class HDMQwen3Tokenizer(sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            super().__init__(str(TOKENIZER_DIR), pad_with_end=False, embedding_directory=embedding_directory,
                             embedding_size=hidden, embedding_key=TE_NAME, tokenizer_class=Qwen2Tokenizer,
                             has_start_token=False, has_end_token=False, pad_to_max_length=False,
                             max_length=99999999, min_length=1, pad_token=PAD_TOKEN_ID,
                             tokenizer_data=tokenizer_data or {})

    class HDMTokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, name=TE_NAME,
                             tokenizer=HDMQwen3Tokenizer)

        def tokenize_official(self, text: str) -> dict:
            """The raw prompt as the official pipeline tokenizes it (no weight syntax, no escapes)."""
            ids = getattr(self, TE_NAME).tokenizer(text, add_special_tokens=False)["input_ids"]
            return {TE_NAME: [[(int(i), 1.0) for i in (ids or [PAD_TOKEN_ID])]]}

    return HDMTokenizer


# ---------------------------------------------------------------------------------------------------
# Files and state dicts
# ---------------------------------------------------------------------------------------------------

def list_files(kind: str) -> list[str]:
    return folder_paths.get_filename_list(kind)


def missing_file_message(kind: str, name: str) -> str | None:
    """None if `name` exists in the `kind` model folders, else a message naming the folders to use."""
    if not isinstance(name, str) or folder_paths.get_full_path(kind, name) is not None:  # linked: checked later
        return None
    roots = folder_paths.get_folder_paths(kind)
    hint = {"checkpoints": f"the HDM single file (e.g. {RELEASED_FILE})",
            "diffusion_models": "an HDM diffusion-model file (XUT weights)",
            "text_encoders": "a Qwen3-0.6B text encoder (.safetensors)",
            "vae": "the EQ-SDXL-VAE (.safetensors)"}.get(kind, "the file")
    return (f"{kind} file '{name}' not found. Put {hint} into models/{kind} (searched: {', '.join(roots)}) "
            f"and press 'r' in the UI to refresh the list.")


def _load(kind: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    message = missing_file_message(kind, name)
    if message:
        raise FileNotFoundError(message)
    sd, metadata = comfy.utils.load_torch_file(folder_paths.get_full_path(kind, name), safe_load=True,
                                               return_metadata=True)
    return sd, metadata or {}


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _stats(sd: dict) -> tuple[Any, Any]:
    mean, std = sd.get("vae_mean"), sd.get("vae_std")
    return (EQVAE_MEAN if mean is None else mean.float().flatten().tolist(),
            EQVAE_STD if std is None else std.float().flatten().tolist())


def diffusion_part(sd: dict, name: str) -> dict:
    for prefix in _DM_PREFIXES:
        if prefix + "in_patch.proj.weight" in sd and prefix + "ctx_proj.weight" in sd:
            return _strip(sd, prefix)
    raise CheckpointError(
        f"'{name}' is not an HDM model: it looks like {describe_architecture(sd)}. HDM files contain "
        f"'{UNET_PREFIX}in_patch.proj.weight' (the released single file, {RELEASED_FILE}, goes in models/"
        f"checkpoints) or 'in_patch.proj.weight' (a diffusion-model-only file for models/diffusion_models). "
        f"For other model families use ComfyUI's Load Checkpoint node.")


def text_encoder_part(sd: dict, name: str) -> dict:
    """Bare Qwen3Model keys from any layout (HDM single file, transformers, ComfyUI, bare)."""
    prefixes = sorted({k[:-len("embed_tokens.weight")] for k in sd if k.endswith("embed_tokens.weight")}, key=len)
    if not prefixes:
        raise CheckpointError(
            f"'{name}' contains no text-encoder weights (no '*embed_tokens.weight'; it looks like "
            f"{describe_architecture(sd)}). "
            f"HDM needs Qwen3-0.6B: use the released single file {RELEASED_FILE} (it includes the encoder) in "
            f"models/checkpoints, or put a Qwen3-0.6B .safetensors in models/text_encoders and use HDM Split Loader.")
    te = _strip(sd, prefixes[0])
    if "layers.0.self_attn.q_norm.weight" not in te:
        raise CheckpointError(f"the text encoder in '{name}' is not Qwen3 (no q_norm weights under '{prefixes[0]}'); "
                              f"HDM needs Qwen3-0.6B in models/text_encoders")
    config = qwen3_config(te)
    expected = ["embed_tokens.weight", "norm.weight"] + [f"layers.{i}.{k}" for i in range(config["num_hidden_layers"])
                                                         for k in _QWEN3_LAYER_KEYS]
    missing = [k for k in expected if k not in te]
    if missing:
        raise CheckpointError(f"the Qwen3 text encoder in '{name}' is incomplete: {len(missing)} missing tensors "
                              f"{missing[:4]}; the file is damaged: download or copy it again")
    return {k: te[k] for k in expected}


def vae_part(sd: dict, name: str) -> dict:
    if PIXEL_SPACE_KEY in sd or "pixel_space_vae" in sd:
        return {"pixel_space_vae": torch.tensor(1.0)}
    prefixes = sorted({k[:-len("decoder.conv_in.weight")] for k in sd if k.endswith("decoder.conv_in.weight")}, key=len)
    if not prefixes:
        raise CheckpointError(
            f"'{name}' contains no VAE weights (no '*decoder.conv_in.weight'). HDM uses the EQ-SDXL-VAE: use the "
            f"released single file {RELEASED_FILE}, or put the VAE .safetensors in models/vae and use HDM Split "
            f"Loader.")
    return _strip(sd, prefixes[0])


# ---------------------------------------------------------------------------------------------------
# Building MODEL / CLIP / VAE
# ---------------------------------------------------------------------------------------------------

def build_model(unet_sd: dict, metadata: dict, *, stats=(EQVAE_MEAN, EQVAE_STD), pixel_space: bool = False,
                dtype: torch.dtype | None = None, te_config: dict | None = None):
    """A ModelPatcher around HDMModel, with ComfyUI's dtype selection and initial placement."""
    if CONFIG_METADATA_KEY in metadata:
        config = XUTConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    else:
        config = infer_config(unet_sd)
    latent_format = HDMPixelSpace() if pixel_space or config.input_dim == 3 else HDMEQVAE(*stats)
    model_config = HDMModelConfig(config, latent_format=latent_format, te_config=te_config)
    parameters = comfy.utils.calculate_parameters(unet_sd)
    load_device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=model_config.supported_inference_dtypes,
                              weight_dtype=comfy.utils.weight_dtype(unet_sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                 model_config.supported_inference_dtypes))
    initial_device = mm.unet_inital_load_device(parameters, dtype)
    model = model_config.get_model(device=initial_device)
    expected = set(model.diffusion_model.state_dict())
    missing, unexpected = sorted(expected - set(unet_sd)), sorted(set(unet_sd) - expected)
    if missing or unexpected:
        raise CheckpointError(f"HDM weights do not match their config {config.to_dict()}: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}; the file is damaged or of an unsupported variant")
    model.load_model_weights(dict(unet_sd), "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    if initial_device != torch.device("cpu"):
        mm.load_models_gpu([patcher], force_full_load=True)
    return patcher


def build_clip(te_sd: dict, model_options: dict | None = None):
    config = qwen3_config(te_sd)
    clip_sd = {f"{TE_NAME}.transformer.model.{k}": v for k, v in te_sd.items()}
    target = comfy.supported_models_base.ClipTarget(tokenizer_class(config), text_encoder_class(config))
    return comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=comfy.utils.calculate_parameters(clip_sd), state_dict=clip_sd,
                         model_options=model_options or {})


def build_vae(vae_sd: dict, metadata: dict | None = None):
    vae = comfy.sd.VAE(sd=vae_sd, metadata=metadata)
    vae.throw_exception_if_invalid()
    return vae


def load_checkpoint(ckpt_name: str):
    """MODEL, CLIP, VAE from the released single-file checkpoint in models/checkpoints."""
    sd, metadata = _load("checkpoints", ckpt_name)
    unet_sd = diffusion_part(sd, ckpt_name)
    if not any(k.startswith(TE_PREFIX) for k in sd):
        raise CheckpointError(
            f"'{ckpt_name}' has the HDM diffusion model but no text-encoder weights ('{TE_PREFIX}*'). Use HDM Split "
            f"Loader: put this file in models/diffusion_models, Qwen3-0.6B in models/text_encoders and the "
            f"EQ-SDXL-VAE in models/vae.")
    te_sd = text_encoder_part(_strip(sd, TE_PREFIX), ckpt_name)
    pixel = PIXEL_SPACE_KEY in sd
    if not pixel and not any(k.startswith(VAE_PREFIX) for k in sd):
        raise CheckpointError(
            f"'{ckpt_name}' has no VAE weights ('{VAE_PREFIX}*'). Use HDM Split Loader with the EQ-SDXL-VAE in "
            f"models/vae (or ComfyUI's Load VAE node next to this loader).")
    vae_sd = vae_part(_strip(sd, VAE_PREFIX) if not pixel else sd, ckpt_name)
    model = build_model(unet_sd, metadata, stats=_stats(sd), pixel_space=pixel, te_config=qwen3_config(te_sd))
    return model, build_clip(te_sd), build_vae(vae_sd, metadata)


def load_split(unet_name: str, clip_name: str, vae_name: str, weight_dtype: str = "default"):
    """MODEL, CLIP, VAE from diffusion_models/, text_encoders/ and vae/ files."""
    sd, metadata = _load("diffusion_models", unet_name)
    unet_sd = diffusion_part(sd, unet_name)
    te_file, _ = _load("text_encoders", clip_name)
    te_sd = text_encoder_part(te_file, clip_name)
    vae_file, vae_meta = _load("vae", vae_name)
    vae_sd = vae_part(vae_file, vae_name)
    stats = _stats(vae_file) if "vae_mean" in vae_file else _stats(sd)
    model = build_model(unet_sd, metadata, stats=stats, pixel_space="pixel_space_vae" in vae_sd,
                        dtype=DTYPES[weight_dtype], te_config=qwen3_config(te_sd))
    return model, build_clip(te_sd), build_vae(vae_sd, vae_meta)


# ---------------------------------------------------------------------------------------------------
# HDM Sampler
# ---------------------------------------------------------------------------------------------------

def _as_ksampler(fn):
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback)
    return comfy.samplers.KSAMPLER(sample)


def with_default_camera(conditioning: list) -> list:
    """The official pipeline always passes a camera map (identity by default): add it where none is set."""
    return [[t, d if any(k in d for k in CAMERA_KEYS) else {**d, **CAMERA_DEFAULTS}] for t, d in conditioning]


def batch_noise(latent: dict, samples: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise where sample i uses seed + batch_index[i] (hdm_core's convention), so a frame does not depend on
    its batch; a latent whose batch_index repeats (camera sweep) gets the same noise for every frame."""
    indices = latent.get("batch_index") or list(range(samples.shape[0]))
    shape = (1, *samples.shape[1:])
    return torch.cat([seeded_noise(shape, (seed + int(i)) % 2**64) for i in indices]).to(samples.dtype)


def hdm_sample(model, positive, negative, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
               shift: float, denoise: float) -> dict:
    """HDM Sampler: official (optionally shifted) uniform schedule and an hdm_core sampler, run by ComfyUI."""
    if not isinstance(model.model, HDMModel):
        raise ValueError(f"HDM Sampler needs an HDM MODEL (from HDM Checkpoint Loader / HDM Split Loader), got "
                         f"{type(model.model).__name__}; use KSampler for other models")
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    out = dict(latent)
    if denoise <= 0.0:  # nothing to denoise
        out["samples"] = samples
        return out
    sigmas = flow_sigmas(steps, shift, denoise)  # img2img: the last `steps` steps of a steps/denoise schedule
    noise = batch_noise(latent, samples, seed)
    torch.manual_seed(seed)  # TREAD routing draws from the global RNG, as with KSampler
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    out["samples"] = comfy.sample.sample_custom(
        model, noise, cfg, _as_ksampler(SAMPLERS[sampler_name]), sigmas, with_default_camera(positive),
        with_default_camera(negative), samples, noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return out


__all__ = ["HDMEQVAE", "HDMPixelSpace", "HDMModel", "HDMModelConfig", "hdm_sample", "load_checkpoint",
           "load_split", "list_files", "missing_file_message"]
