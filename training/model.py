"""The model a stage trains: its config (preset or init file + overrides), the fit with the encoders, the XUT and
its EMA, and, for adapter runs, the frozen XUT with LyCORIS adapters (training/finetune.py)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from hdm_core.config import PRESETS, XUTConfig, latent_size
from hdm_core.layout import check_config
from hdm_core.xut import XUT

from .finetune import AdaptedXUT, Adapters, attach
from .recipe import Recipe

if TYPE_CHECKING:
    from hdm_core.text_encoder import TextEncoder

    from .encoders import Vae


def model_config(recipe: Recipe, init_config: XUTConfig | None) -> XUTConfig:
    """Preset (or the init checkpoint's config) + recipe overrides, with the recipe's TREAD rate recorded."""
    m = recipe.model
    if m.preset:
        if m.preset not in PRESETS:
            raise ValueError(f"model.preset {m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        base = PRESETS[m.preset].to_dict()
    elif init_config is not None:
        base = init_config.to_dict()
    else:
        raise ValueError("model.preset is empty and there is no model.init_from to take the config from")
    over = dict(m.config)
    over["tread_config"] = {**base["tread_config"], **over.get("tread_config", {}), "dropout_ratio": m.tread_rate}
    try:
        return check_config(XUTConfig.from_dict({**base, **over}))
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.config {m.config}: {err}") from err


def check_fit(recipe: Recipe, cfg: XUTConfig, text_encoder: TextEncoder, vae: Vae) -> None:
    """The encoders fit the model, and the data's pixel sizes are whole patches of latents."""
    if text_encoder.hidden_size != cfg.ctx_dim or vae.latent_channels != cfg.input_dim:
        raise ValueError(f"encoders do not fit the model: text hidden {text_encoder.hidden_size} vs ctx_dim "
                         f"{cfg.ctx_dim}, VAE channels {vae.latent_channels} vs input_dim {cfg.input_dim}; "
                         f"fix model.text_encoder / model.vae or model.config")
    d = recipe.data
    for name, side in {"resolution": d.resolution, **({"bucket_step": d.bucket_step} if d.bucketing else {})}.items():
        try:
            latent_size(side, side, downscale=vae.downscale_factor, patch=cfg.patch_size)
        except ValueError as err:
            raise ValueError(f"data.{name} {side}: {err}") from err


def build_model(recipe: Recipe, cfg: XUTConfig, init_sd: dict | None,
                device: torch.device) -> tuple[XUT, XUT | None]:
    """The XUT to train (official init, or model.init_from's weights) and its EMA copy (None when off)."""
    model = XUT(cfg, device=device)
    if init_sd is None:
        model.init_for_training()
    else:
        try:
            model.load_state_dict(init_sd)
        except RuntimeError as err:
            raise ValueError(f"model.init_from {recipe.model.init_from} does not match the recipe's model "
                             f"{cfg.to_dict()}: {str(err)[:300]}") from err
    model.gradient_checkpointing = recipe.model.gradient_checkpointing
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False).eval() if recipe.train.ema_decay > 0 else None
    return model, ema


def build_trainee(recipe: Recipe, model: XUT, text_encoder: TextEncoder) -> tuple[Adapters | None, torch.nn.Module]:
    """(adapters, the module the loss calls): (None, model) for full training; for an adapter run the XUT (and
    text encoder) are frozen and the adapters patched in, seeded so every rank starts from the same ones."""
    if not recipe.finetune.adapter:
        return None, model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        adapters = attach(recipe.finetune, model, text_encoder)
    return adapters, AdaptedXUT(model, adapters)
