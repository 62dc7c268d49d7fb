"""The training objective: rectified flow (flow matching) on VAE latents, in hdm_core.flow's convention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hdm_core.flow import interpolate, sample_t_logit_normal, velocity_target
from hdm_core.tread import random_keep_index

from .data import Batch
from .recipe import ModelSection


@torch.no_grad()
def encode_batch(batch: Batch, text_encoder: Any, vae: Any, max_length: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ctx): normalised latents (a posterior sample) and text embeddings, from the cache when it has them."""
    if batch.latent_mean is not None:  # cached posterior: draw the sample here, as the online path does
        mean, std = batch.latent_mean.float(), batch.latent_std.float()
        x0 = vae.normalize(mean + std * torch.randn(mean.shape, generator=gen, device=mean.device))
    else:
        pixels = batch.pixels.float() / 127.5 - 1                                # (B, 3, H, W) in [-1, 1]
        x0 = vae.encode(pixels, generator=gen).float()                           # (B, C, H/f, W/f)
    if batch.ctx is not None:
        return x0, batch.ctx.float()
    return x0, text_encoder.encode_padded(batch.captions, max_length=max_length).float()


def training_loss(model: torch.nn.Module, batch: Batch, text_encoder: Any, vae: Any, m: ModelSection,
                  gen: torch.Generator, autocast: Any, patch_size: int) -> torch.Tensor:
    """Flow matching: t ~ logit-normal(0, 1), x_t = t·ε + (1 − t)·x0, MSE of v against ε − x0 (batch on device)."""
    x0, ctx = encode_batch(batch, text_encoder, vae, m.max_length, gen)
    with torch.no_grad():
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        t = sample_t_logit_normal(x0.shape[0], generator=gen, device=x0.device)
        x_t = interpolate(x0, noise, t)
        # TREAD: the kept tokens are drawn here (the same draw the model would make), so the compiled training
        # step is one graph: a torch.Generator cannot be traced.
        tokens = (x0.shape[-2] // patch_size) * (x0.shape[-1] // patch_size)
        keep = random_keep_index(x0.shape[0], tokens, m.tread_rate, generator=gen, device=x0.device) \
            if m.tread_rate else None
    with autocast():
        v = model(x_t, t, ctx, pos_map=batch.pos, aspect=batch.aspect, tread_keep=keep)
    return F.mse_loss(v.float(), velocity_target(x0, noise))
