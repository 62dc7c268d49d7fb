"""Text-to-image (and img2img) generation with an HDM model: the official recipe of SPEC §1 plus the
sampler, schedule-shift, camera, TREAD-autoguidance, img2img and tiled-sampling options (tiles: `TiledModel`,
hdm_core.canvas)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .adapters import AdapterSource, adapters_applied
from .canvas import Camera, Tiling, canvas_position_map, per_tile, tiled_forward
from .checkpoint import HDMComponents
from .config import latent_size
from .flow import denoised_from_velocity, interpolate
from .rope import aspect_info
from .sampling import MAX_STEPS, SAMPLERS, cfg_velocity, flow_sigmas


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
    camera: Camera = field(default_factory=Camera)
    tread_gamma_cond: float = 0.0
    tread_gamma_uncond: float = 0.0
    strength: float = 1.0  # img2img denoise; 1 = text-to-image
    tile_size: int = 0     # tiled sampling: square tiles of this many px (0 = off; see hdm_core.canvas)
    tile_overlap: int = 0  # px shared by neighbouring tiles
    tile_positions: str = "canvas"  # "canvas": each tile its slice of the canvas's map; "own": a picture of its own
    tile_batch: int = 1    # tiles per model call (faster; memory grows with it)
    max_prompt_tokens: int | None = None  # cut longer prompts (None: never; HDM was trained on up to 256)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> GenerationParams:
        """Raise ValueError naming the first unusable value and its valid range; cheap, so run it before loading."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if not isinstance(text, str):
                raise ValueError(f"{name} must be a string, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # lone surrogates: undecodable bytes read with surrogateescape
                raise ValueError(f"{name} is not valid UTF-8 text ({err.reason} at {err.start}); re-save it as "
                                 f"UTF-8") from None
        _whole(self, "width", 1, MAX_SIDE)
        _whole(self, "height", 1, MAX_SIDE)
        _whole(self, "steps", 1, MAX_STEPS)
        _whole(self, "batch_size", 1, MAX_BATCH)
        _whole(self, "seed", 0, 2**64 - self.batch_size)
        if self.width * self.height > MAX_PIXELS:
            raise ValueError(f"{self.width}x{self.height} is {self.width * self.height / 1e6:.0f} megapixels, above "
                             f"the {MAX_PIXELS / 1e6:.1f} MP limit (HDM is trained at 1 MP); generate at 1 MP and "
                             f"upscale, or raise hdm_core.pipeline.MAX_PIXELS if you have the memory")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        _number(self, "cfg", 0.0, 100.0)
        _number(self, "shift", 0.01, 100.0)
        if not isinstance(self.camera, Camera):
            raise ValueError(f"camera must be an hdm_core.canvas.Camera, got {type(self.camera).__name__}")
        _number(self, "tread_gamma_cond", 0.0, 0.99)
        _number(self, "tread_gamma_uncond", 0.0, 0.99)
        _number(self, "strength", 1e-3, 1.0)
        if self.max_prompt_tokens is not None:
            _whole(self, "max_prompt_tokens", 1, 1_000_000)
        _whole(self, "tile_size", 0, MAX_SIDE)
        _whole(self, "tile_overlap", 0, max(self.tile_size - 1, 0))
        _whole(self, "tile_batch", 1, 1024)
        if self.tile_positions not in TILE_POSITIONS:
            raise ValueError(f"tile_positions must be one of {TILE_POSITIONS}, got {self.tile_positions!r}")
        return self

    def tiling(self, downscale: int, patch: int) -> Tiling | None:
        """The tiles in latent cells (None when untiled): the tile a multiple of downscale × patch px (whole
        patches), the overlap of downscale px (whole latent cells)."""
        if not self.tile_size:
            return None
        unit = downscale * patch
        if self.tile_size % unit:
            raise ValueError(f"tile_size {self.tile_size} px must be a multiple of {unit} px for this model")
        if self.tile_overlap % downscale:
            raise ValueError(f"tile_overlap {self.tile_overlap} px must be a multiple of {downscale} px for this "
                             f"model")
        tile = self.tile_size // downscale
        return Tiling(tile, tile, self.tile_overlap // downscale, own_positions=self.tile_positions == "own",
                      batch=self.tile_batch)


TILE_POSITIONS = ("canvas", "own")
MAX_SIDE = 16_384           # pixels per side
MAX_PIXELS = 4096 * 4096    # per image; HDM is trained at about 1 MP
MAX_BATCH = 256


def _whole(params: GenerationParams, name: str, low: int, high: int) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")


def _number(params: GenerationParams, name: str, low: float, high: float) -> None:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise for a batch where sample i uses seed + i, so an image does not depend on the batch it is in."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + i))
                        for i in range(shape[0])])


def make_denoiser(model: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float, *,
                  pos_map: torch.Tensor | None, aspect: torch.Tensor, gamma_cond: float = 0.0,
                  gamma_uncond: float = 0.0, generator: torch.Generator | None = None,
                  batch_cfg: bool | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A k-diffusion denoiser x, σ → x0 with CFG on the velocity and per-branch TREAD rates (0 = off).

    cond / uncond: contexts [1 or B, L, D]; their lengths may differ. batch_cfg: run both branches as one
    forward of twice the batch, the shorter context zero-padded and hidden from attention by `ctx_mask` (the
    result equals two calls to float rounding); None = `batch_cfg_default`. With TREAD on either branch the
    branches always run separately (each draws its own routing from `generator`, in order).
    """
    dtype = next(model.parameters()).dtype
    guided = uncond is not None and cfg != 1.0
    if batch_cfg is None and guided:
        batch_cfg = batch_cfg_default(next(model.parameters()).device, masked=cond.shape[1] != uncond.shape[1])
    if guided and batch_cfg and not (gamma_cond or gamma_uncond):
        return _batched_cfg_denoiser(model, dtype, cond, uncond, cfg, pos_map, aspect)

    def velocity(x: torch.Tensor, sigma: torch.Tensor, ctx: torch.Tensor, gamma: float) -> torch.Tensor:
        v = model(x.to(dtype), sigma.to(dtype), ctx.expand(x.shape[0], -1, -1), pos_map=pos_map, aspect=aspect,
                  tread_rate=gamma or None, generator=generator)
        return v.float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = velocity(x, sigma, cond, gamma_cond)
        if guided:
            v = cfg_velocity(v, velocity(x, sigma, uncond, gamma_uncond), cfg)
        return denoised_from_velocity(x, v, sigma)

    return denoise


def batch_cfg_default(device: torch.device, masked: bool) -> bool:
    """Whether `make_denoiser` batches the CFG branches by default: always when both contexts have one length
    (no mask); with a mask on CPU, where it measured 1.0–1.3× faster (BENCHMARKS.md, "Batched CFG"), but not
    on CUDA, where the mask rules out the flash-attention kernel (bench/gpu_check.py measures both)."""
    return not masked or torch.device(device).type != "cuda"


def pad_contexts(contexts: list[torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack contexts [1 or B, L_i, D] into [n·B, max L, D], zero-padded at the end, and its ctx_mask
    [n·B, max L] (True = real token); the mask is None when every length is the same."""
    length = max(c.shape[1] for c in contexts)
    padded = [torch.nn.functional.pad(c, (0, 0, 0, length - c.shape[1])).expand(batch, -1, -1) for c in contexts]
    if all(c.shape[1] == length for c in contexts):
        return torch.cat(padded), None
    mask = [(torch.arange(length, device=c.device) < c.shape[1]).expand(batch, -1) for c in contexts]
    return torch.cat(padded), torch.cat(mask)


def _batched_cfg_denoiser(model: torch.nn.Module, dtype: torch.dtype, cond: torch.Tensor, uncond: torch.Tensor,
                          cfg: float, pos_map: torch.Tensor | None,
                          aspect: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """CFG as one forward over [cond batch; uncond batch]."""
    def twice(a: torch.Tensor | None, batched: bool) -> torch.Tensor | None:  # per-sample values: both halves
        return torch.cat((a, a)) if batched and a.shape[0] > 1 else a

    aspect = torch.as_tensor(aspect)
    pos2 = twice(pos_map, pos_map is not None and pos_map.dim() == 3)   # [H·W, 2] and [1, H·W, 2] are shared
    aspect2, prepared = twice(aspect, aspect.dim() > 0), {}

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b not in prepared:  # built once per batch size, so every step feeds the model the same tensors
            prepared[b] = pad_contexts([cond, uncond], b)
        ctx, ctx_mask = prepared[b]
        v = model(torch.cat((x, x)).to(dtype), torch.cat((sigma, sigma)).to(dtype), ctx, pos_map=pos2,
                  aspect=aspect2, ctx_mask=ctx_mask)
        v_cond, v_uncond = v.float().chunk(2)
        return denoised_from_velocity(x, cfg_velocity(v_cond, v_uncond, cfg), sigma)

    return denoise


class TiledModel(torch.nn.Module):
    """A diffusion model called tile by tile (`hdm_core.canvas.tiled_forward`), with the model's own signature."""

    def __init__(self, model: torch.nn.Module, tiling: Tiling, camera: Camera) -> None:
        super().__init__()
        self.model, self.tiling, self.camera = model, tiling, camera

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, *, pos_map: torch.Tensor,
                aspect: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        b = x.shape[0]

        def tile(x_tiles: torch.Tensor, maps: torch.Tensor, aspects: torch.Tensor) -> torch.Tensor:
            n = x_tiles.shape[0] // b
            more = {k: per_tile(v, b, n) if torch.is_tensor(v) and v.dim() else v for k, v in kwargs.items()}
            return self.model(x_tiles, per_tile(t, b, n), per_tile(ctx, b, n), pos_map=maps, aspect=aspects, **more)
        return tiled_forward(tile, x, pos_map, aspect.reshape(-1).expand(x.shape[0]), self.tiling, [self.camera])


@torch.no_grad()
def generate(components: HDMComponents, params: GenerationParams, *, init_image: torch.Tensor | None = None,
             callback: Callable[[dict[str, Any]], None] | None = None, decode: bool = True,
             loras: Sequence[tuple[AdapterSource, float]] = ()) -> torch.Tensor:
    """Run the whole pipeline → images [B, 3, H, W] in [0, 1] (or normalised latents if decode=False).

    init_image [B or 1, 3, H, W] in [0, 1] with params.strength < 1 gives img2img. The callback receives the
    k-diffusion step dict; raise `hdm_core.sampling.SamplingCancelled` from it to stop. loras: (.safetensors path
    or state dict, strength) pairs merged into the model and text encoder for this call only (the components are
    restored bit for bit afterwards; see `hdm_core.adapters.adapters_applied`).
    """
    params.validate()
    model, te, vae = components.model, components.text_encoder, components.vae
    if te is None:
        raise ValueError("this checkpoint has no text encoder: load a Qwen3-0.6B file as the text encoder")
    if vae is None and decode:
        raise ValueError("this checkpoint has no VAE: load an EQ-SDXL-VAE file, or ask for latents (decode=False)")
    if init_image is None and params.strength < 1.0:
        raise ValueError(f"strength {params.strength} is for img2img: pass an init image, or use strength 1")
    if loras:  # the touched weights are saved and put back: cheaper than copying the components
        with adapters_applied(components.model, loras, text_encoder=te):
            return generate(components, params, init_image=init_image, callback=callback, decode=decode)
    device = next(model.parameters()).device
    cfg = components.config
    downscale = getattr(vae, "downscale_factor", 8)
    lat_h, lat_w = latent_size(params.width, params.height, downscale=downscale, patch=cfg.patch_size,
                               round_down=True)

    cond, uncond = (c.to(device) for c in te.encode([params.prompt, params.negative_prompt],
                                                    max_tokens=params.max_prompt_tokens))
    b = params.batch_size
    pos_map = canvas_position_map(lat_h, lat_w, params.camera, device=device)
    aspect = torch.full((b,), aspect_info(lat_h, lat_w), device=device)
    generator = torch.Generator(device).manual_seed(params.seed) if (params.tread_gamma_cond or
                                                                     params.tread_gamma_uncond) else None
    tiling = params.tiling(downscale, cfg.patch_size)
    if tiling is not None:
        model = TiledModel(model, tiling, params.camera)
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
    if not torch.isfinite(latents).all():  # one reduction per image: nothing to measure against sampling
        raise FloatingPointError("the sampled latent holds NaN or Inf: the weights hold non-finite values or the "
                                 "model overflowed in this dtype (try --dtype bf16 or fp32); nothing was written")
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
