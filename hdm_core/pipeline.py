"""Text-to-image (and img2img) generation with an HDM model: the official recipe of SPEC §1 plus the
sampler, schedule-shift, camera, TREAD-autoguidance and img2img options."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .checkpoint import HDMComponents
from .config import latent_size
from .flow import denoised_from_velocity, interpolate
from .rope import aspect_info, camera_position_map
from .sampling import SAMPLERS, cfg_velocity, flow_sigmas


@dataclass
class GenerationParams:
    """Everything that determines an image; stored in the PNG metadata."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 32
    cfg: float = 3.0
    sampler: str = "euler"
    shift: float = 1.0
    seed: int = 0
    batch_size: int = 1
    x_shift: float = 0.0
    y_shift: float = 0.0
    zoom: float = 1.0
    tread_gamma_cond: float = 0.0
    tread_gamma_uncond: float = 0.0
    strength: float = 1.0  # img2img denoise; 1 = text-to-image

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise for a batch where sample i uses seed + i, so an image does not depend on the batch it is in."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + i))
                        for i in range(shape[0])])


def make_denoiser(model: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float, *,
                  pos_map: torch.Tensor, aspect: torch.Tensor, gamma_cond: float = 0.0, gamma_uncond: float = 0.0,
                  generator: torch.Generator | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A k-diffusion denoiser x, σ → x0 with CFG on the velocity and per-branch TREAD rates (0 = off).

    cond / uncond [1, L, D] contexts are never padded into each other (their lengths may differ).
    """
    dtype = next(model.parameters()).dtype

    def velocity(x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor, gamma: float) -> torch.Tensor:
        v = model(x.to(dtype), sigma.to(dtype), ctx.expand(x.shape[0], -1, -1), pos_map=pos_map, aspect=aspect,
                  tread_rate=gamma or None, generator=generator)
        return v.float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = velocity(x, sigma, cond, gamma_cond)
        if uncond is not None and cfg != 1.0:
            v = cfg_velocity(v, velocity(x, sigma, uncond, gamma_uncond), cfg)
        return denoised_from_velocity(x, v, sigma)

    return denoise


@torch.no_grad()
def generate(components: HDMComponents, params: GenerationParams, *, init_image: torch.Tensor | None = None,
             callback: Callable[[dict[str, Any]], None] | None = None, decode: bool = True) -> torch.Tensor:
    """Run the whole pipeline → images [B, 3, H, W] in [0, 1] (or normalised latents if decode=False).

    init_image [B or 1, 3, H, W] in [0, 1] with params.strength < 1 gives img2img. The callback receives the
    k-diffusion step dict; raise `hdm_core.sampling.SamplingCancelled` from it to stop.
    """
    model, te, vae = components.model, components.text_encoder, components.vae
    if te is None:
        raise ValueError("this checkpoint has no text encoder: load a Qwen3-0.6B file as the text encoder")
    if vae is None and decode:
        raise ValueError("this checkpoint has no VAE: load an EQ-SDXL-VAE file, or ask for latents (decode=False)")
    if params.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {params.sampler!r}; choose one of {sorted(SAMPLERS)}")
    device = next(model.parameters()).device
    cfg = components.config
    downscale = getattr(vae, "downscale_factor", 8)
    lat_h, lat_w = latent_size(params.width, params.height, downscale=downscale, patch=cfg.patch_size,
                               round_down=True)

    cond, uncond = (c.to(device) for c in te.encode([params.prompt, params.negative_prompt]))
    b = params.batch_size
    pos_map = camera_position_map(lat_h, lat_w, params.x_shift, params.y_shift, params.zoom).to(device)
    aspect = torch.full((b,), aspect_info(lat_h, lat_w), device=device)
    generator = torch.Generator(device).manual_seed(params.seed) if (params.tread_gamma_cond or
                                                                     params.tread_gamma_uncond) else None
    denoise = make_denoiser(model, cond, uncond, params.cfg, pos_map=pos_map, aspect=aspect,
                            gamma_cond=params.tread_gamma_cond, gamma_uncond=params.tread_gamma_uncond,
                            generator=generator)

    img2img = init_image is not None and params.strength < 1.0
    sigmas = flow_sigmas(params.steps, params.shift, params.strength if img2img else 1.0).to(device)
    noise = seeded_noise((b, cfg.input_dim, lat_h, lat_w), params.seed).to(device)
    if img2img:
        x0 = vae.encode(init_image.to(device) * 2 - 1, sample=False).float()
        if x0.shape[-2:] != noise.shape[-2:]:
            raise ValueError(f"init image gives a {tuple(x0.shape[-2:])} latent but the requested size needs "
                             f"{tuple(noise.shape[-2:])}; resize the image to {params.width}x{params.height}")
        x = interpolate(x0.expand_as(noise), noise, sigmas[0])
    else:
        x = noise
    latents = SAMPLERS[params.sampler](denoise, x, sigmas, callback=callback)
    if not decode:
        return latents
    return vae.decode(latents)


def to_pil(images: torch.Tensor) -> list[Any]:
    """[B, 3, H, W] in [0, 1] → PIL images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_grid(images: list[Any], cols: int | None = None, *, pad: int = 0, background: Any = "white",
               title: str = "") -> Any:
    """Tile PIL images of one size into `cols` columns (default: a square-ish grid), `pad` px between and
    around the tiles, with an optional title line on top."""
    from PIL import Image, ImageDraw

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    top = 20 if title else 0
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad + top), background)
    if title:
        ImageDraw.Draw(sheet).text((6, 4), title, fill="black")
    for i, im in enumerate(images):
        sheet.paste(im, (pad + (i % cols) * (w + pad), top + pad + (i // cols) * (h + pad)))
    return sheet
