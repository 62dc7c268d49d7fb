"""HDM as a native ComfyUI model (ComfyUI glue: imports ComfyUI at the top).

* `HDMEQVAE` / `HDMPixelSpace`: latent formats (EQ-VAE mean/std normalisation with preview factors).
* `HDMModelConfig` (a `supported_models_base.BASE`) and `HDMModel` (a `model_base.BaseModel`, model type FLOW,
  multiplier 1.0, so the network gets t = σ): built-in KSampler, SamplerCustomAdvanced, ModelSamplingAuraFlow
  and the model-merge nodes work on it unchanged.
* The text context is a `CONDRegular`, not a `CONDCrossAttn`: ComfyUI never repeats a shorter cond/uncond
  context into a longer one (HDM's text tokens join self-attention, SPEC §10); contexts of different lengths
  simply run as separate model calls.
* `HDMDiffusionModel` plugs ComfyUI's machinery into XUT's two injection points: attention is ComfyUI's
  `optimized_attention` (attention flags and overrides apply), and every block runs through a hook that sets
  `transformer_options["block_index"]` and honours `patches_replace["dit"][("double_block", i)]`; its forward
  runs inside ComfyUI's DIFFUSION_MODEL wrapper executor (EasyCache, TorchCompileModel).
"""

from __future__ import annotations

from dataclasses import replace

import comfy.conds
import comfy.latent_formats
import comfy.ldm.modules.attention
import comfy.model_base
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils
import torch
import torch.nn.functional as F

from ..hdm_core.canvas import CAMERA_KEYS, IDENTITY, per_tile, tiled_forward
from ..hdm_core.config import XUTConfig
from ..hdm_core.layout import COMFY_CLIP_PREFIX, TE_PREFIX, UNET_PREFIX, VAE_MEAN_KEY, VAE_PREFIX, VAE_STD_KEY
from ..hdm_core.vae import EQVAE_MEAN, EQVAE_STD, channel_stats
from ..hdm_core.weights import is_fp8
from ..hdm_core.xut import XUT, BlockHook
from .positions import POSITIONS_OPTION, TILES_OPTION, call_positions, canvas_conds
from .text_encoder import text_encoder_class, tokenizer_class

# ComfyUI's activation-memory estimate per latent element (BaseModel.memory_required) is scaled by this factor
# before it frees VRAM for sampling (SD1.5 uses 1.0, SDXL 0.8). 1.2: headroom for XUT's concatenated text tokens
# and cross-attention skips; an estimate, not yet measured on a GPU.
MEMORY_USAGE_FACTOR = 1.2

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

    def __init__(self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        """The file's latent statistics (`vae_mean` / `vae_std`); None: the EQ-SDXL-VAE ones."""
        self.latents_mean = channel_stats(mean, EQVAE_MEAN, VAE_MEAN_KEY)
        self.latents_std = channel_stats(std, EQVAE_STD, VAE_STD_KEY)
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

BLOCK_PATCH = "double_block"  # patches_replace["dit"][(BLOCK_PATCH, i)], the key ComfyUI's DiT-generic nodes use


def comfy_attention(q, k, v, mask=None, transformer_options=None):
    """XUT's attention operation in ComfyUI: `optimized_attention`, the backend the --use-*-attention flags chose
    (looked up per call), which defers to transformer_options["optimized_attention_override"] when set."""
    if mask is not None:  # ComfyUI's backends add a float mask to the scores: 0 = attend, −max = hidden
        mask = (mask.to(q.dtype) - 1) * torch.finfo(q.dtype).max
    return comfy.ldm.modules.attention.optimized_attention(q, k, v, q.shape[1], mask=mask, skip_reshape=True,
                                                           transformer_options=transformer_options or {})


def comfy_block_hook(transformer_options: dict, total_blocks: int) -> BlockHook:
    """XUT's block hook in ComfyUI, as ComfyUI's DiT models do it: block i (execution order over all blocks) sets
    transformer_options "block_index" (and "hdm_block", its state-dict name) and runs through
    patches_replace["dit"][("double_block", i)] when a node set one; the stream is args["img"], as in flux."""
    patches = transformer_options.get("patches_replace", {}).get("dit", {})
    transformer_options.update(total_blocks=total_blocks, block_type="double")

    def hook(index, name, run, args):
        transformer_options.update(block_index=index, hdm_block=name)
        patch = patches.get((BLOCK_PATCH, index))
        if patch is None:
            return run(args)

        def original_block(a: dict) -> dict:
            options = {"transformer_options": a.get("transformer_options", transformer_options)}
            return {"img": run({"x": a["img"], "pos": a["pos"], "mods": a["vec"], "memory": a.get("memory"),
                                "mask": a.get("attn_mask"), "options": options})}
        out = patch({"img": args["x"], "pos": args["pos"], "vec": args["mods"], "memory": args["memory"],
                     "attn_mask": args["mask"], "transformer_options": transformer_options},
                    {"original_block": original_block})
        return out["img"]
    return hook


def keep_small_tensors_float32(model: torch.nn.Module) -> None:
    """fp8 weights: tensors outside ComfyUI's ops layers (RMSNorm gains, RoPE log-frequencies, timestep
    frequencies; 0.02 % of XUT-base's values) stay float32: at 2–3 mantissa bits RoPE and the timestep angles (up to
    1000 rad) would be wrong (one xut-tiny forward: 1.2 relative error instead of 0.10). Cast to the input dtype at
    use."""
    for module in model.modules():
        if isinstance(module, comfy.ops.CastWeightBiasOp):
            continue
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if is_fp8(tensor.dtype):
                tensor.data = tensor.data.float()


def autograd_ready(model: torch.nn.Module) -> None:
    """Training (ComfyUI's TrainLoraNode): tensors outside ComfyUI's ops layers (RMSNorm gains, RoPE and timestep
    frequencies) that were made under ComfyUI's inference mode (the model is built and moved while nodes run) become
    ordinary copies, which autograd may save; ops-layer weights get TrainLoraNode's adapters in front of them."""
    for module in model.modules():
        if isinstance(module, comfy.ops.CastWeightBiasOp):
            continue
        for name, t in module._parameters.items():
            if t is not None and t.is_inference():
                module._parameters[name] = torch.nn.Parameter(t.clone(), requires_grad=t.requires_grad)
        for name, t in module._buffers.items():
            if t is not None and t.is_inference():
                module._buffers[name] = t.clone()


class HDMDiffusionModel(XUT):
    """XUT with ComfyUI's calling convention, attention and block patches; the official state-dict keys."""

    def __init__(self, xut_config: dict, image_model: str = "hdm_xut", dtype=None, device=None, operations=None):
        super().__init__(XUTConfig.from_dict(xut_config), ops=operations or torch.nn, attention=comfy_attention,
                         dtype=dtype, device=device)
        self.dtype = dtype  # read by BaseModel.get_dtype()
        if dtype is not None and is_fp8(dtype):
            keep_small_tensors_float32(self)

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, **kwargs):
        """ComfyUI's entry: the DIFFUSION_MODEL wrappers (EasyCache, …) run around `_forward`, as in flux."""
        transformer_options = {} if transformer_options is None else transformer_options
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                            transformer_options)
        if wrappers:  # EasyCache's skip adds its cached difference to this input in place; in the sampler's dtype
            x = x.clone()  # (fp32) it is the tensor ComfyUI then takes x0 = x − σ·v from, so it gets a copy
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timesteps, context, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context, control, transformer_options, tread_gamma=0.0, **conds):
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():  # training
            autograd_ready(self)
        if context is not None and context.shape[-1] != self.config.ctx_dim:
            raise ValueError(
                f"the conditioning has {context.shape[-1]} features per token but this HDM model expects "
                f"{self.config.ctx_dim}: encode prompts with the CLIP output of an HDM loader")
        _, _, height, width = x.shape
        # A latent side that is not a whole number of patches (e.g. EmptyLatentImage at 8-px steps) is padded
        # to one and the output cropped back, as ComfyUI's other DiT models do.
        patch = self.config.patch_size
        padded = (height + -height % patch, width + -width % patch)
        # Every call gets a latent-resolution map (SPEC §4.3) of its place on the canvas through the camera (the
        # identity camera without a camera node, as the official pipeline always passes one).
        pos_map, aspect, cameras = call_positions(x, conds, transformer_options, patch, padded)
        if padded != (height, width):
            x = F.pad(x, (0, padded[1] - width, 0, padded[0] - height), mode="replicate")
        hook = comfy_block_hook(transformer_options, len(self.block_names))

        def run(x_part, map_part, aspect_part):
            # Tiles stacked along the batch (tile after tile, each the call's samples) get the samples' inputs once
            # per tile; cond_or_uncond names the batch's chunks for patches that split it.
            # HDM-ext / the official loop give the model t in its dtype (fp16: t is rounded before ×1000).
            t, ctx, options = timesteps.to(x.dtype), context, transformer_options
            b, n = x.shape[0], x_part.shape[0] // x.shape[0]
            if n > 1:
                t, ctx = per_tile(t, b, n), per_tile(ctx, b, n)
                options = {**options, "cond_or_uncond": list(options.get("cond_or_uncond", [])) * n}
            return super(HDMDiffusionModel, self).forward(
                x_part, t, ctx, pos_map=map_part, aspect=aspect_part, tread_rate=float(tread_gamma) or None,
                block_hook=hook, attn_options={"transformer_options": options})
        tiling = transformer_options.get(TILES_OPTION)
        if tiling is None:
            out = run(x, pos_map, aspect)
        else:
            own = replace(tiling, own_positions=transformer_options.get(POSITIONS_OPTION) == "own")
            out = tiled_forward(run, x, pos_map, aspect, own, cameras)
        return out[..., :height, :width]


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
        out.update(canvas_conds(kwargs.get("noise")))
        # One TREAD rate per model call: conds with different gammas are never batched together.
        out["tread_gamma"] = comfy.conds.CONDConstant(float(kwargs.get("tread_gamma") or 0.0))
        return out


def camera_tensors(cond: dict) -> dict[str, torch.Tensor] | None:
    """x_shift / y_shift / zoom of a conditioning dict as float32 [F] tensors (None when no camera is set)."""
    if not any(k in cond for k in CAMERA_KEYS):
        return None
    values = [torch.as_tensor(cond.get(k, getattr(IDENTITY, k)), dtype=torch.float32).reshape(-1) for k in CAMERA_KEYS]
    frames = max(v.numel() for v in values)
    return {k: v.expand(frames) if v.numel() == 1 else v for k, v in zip(CAMERA_KEYS, values)}


class HDMModelConfig(comfy.supported_models_base.BASE):
    unet_config = {"image_model": "hdm_xut"}
    unet_extra_config = {}
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}
    latent_format = HDMEQVAE
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    memory_usage_factor = MEMORY_USAGE_FACTOR
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
        return {TE_PREFIX + k[len(COMFY_CLIP_PREFIX):]: v for k, v in state_dict.items()
                if k.startswith(COMFY_CLIP_PREFIX)}

    def process_vae_state_dict_for_saving(self, state_dict):
        out = comfy.utils.state_dict_prefix_replace(state_dict, {"": VAE_PREFIX})
        if isinstance(self.latent_format, HDMEQVAE):
            out[VAE_MEAN_KEY], out[VAE_STD_KEY] = self.latent_format.latents_mean, self.latent_format.latents_std
        return out
