"""The training objective: rectified flow (flow matching) on VAE latents, in hdm_core.flow's convention."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hdm_core.flow import interpolate, sample_t_logit_normal, velocity_target
from hdm_core.tread import random_keep_index

from .data import Batch
from .recipe import ModelSection

if TYPE_CHECKING:
    from hdm_core.text_encoder import TextEncoder

    from .encoders import Vae


def encode_batch(batch: Batch, text_encoder: TextEncoder, vae: Vae, max_length: int, gen: torch.Generator,
                 text_autocast: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ctx): normalised latents (a posterior sample) and text embeddings, from the cache when it has them.
    With `text_autocast` (a text-encoder adapter is trained) the text is encoded with autograd, under it."""
    with torch.no_grad():
        if batch.latent_mean is not None:  # cached posterior: draw the sample here, as the online path does
            mean, std = batch.latent_mean.float(), batch.latent_std.float()
            x0 = vae.normalize(mean + std * torch.randn(mean.shape, generator=gen, device=mean.device))
        else:
            pixels = batch.pixels.float() / 127.5 - 1                            # (B, 3, H, W) in [-1, 1]
            x0 = vae.encode(pixels, generator=gen).float()                       # (B, C, H/f, W/f)
    if batch.ctx is not None:
        return x0, batch.ctx.float()
    if text_autocast is None:
        return x0, text_encoder.encode_padded(batch.captions, max_length=max_length).float()
    with text_autocast():
        return x0, text_encoder.padded_hidden(batch.captions, max_length=max_length).float()


def training_loss(model: torch.nn.Module, batch: Batch, text_encoder: TextEncoder, vae: Vae, m: ModelSection,
                  gen: torch.Generator, autocast: Any, patch_size: int, train_text: bool = False) -> torch.Tensor:
    """Flow matching: t ~ logit-normal(0, 1), x_t = t·ε + (1 − t)·x0, MSE of v against ε − x0 (batch on device);
    with `batch.loss_weight`, each sample's MSE is multiplied by its weight (`weighted_mse`). `train_text`: the
    text encoder has a trained adapter, so its output keeps its graph."""
    x0, ctx = encode_batch(batch, text_encoder, vae, m.max_length, gen, autocast if train_text else None)
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
    if batch.loss_weight is None:
        return F.mse_loss(v.float(), velocity_target(x0, noise))
    return weighted_mse(v.float(), velocity_target(x0, noise), batch.loss_weight)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight_b · MSE_b (kohya's loss weights: a weight scales its samples' gradient, also
    in a batch of one or of one dataset; dividing by Σw instead would cancel it there). Weights of 1 give
    `F.mse_loss` bit for bit: the same elementwise loss, times exactly 1, and the same mean."""
    per_element = F.mse_loss(pred, target, reduction="none")                       # (B, C, H, W)
    return (per_element * weight.to(per_element).view(-1, *[1] * (pred.dim() - 1))).mean()
