"""EQ-SDXL-VAE wrapper with HDM's per-channel latent normalisation, and an identity pixel-space stand-in (SPEC §7).

diffusers is imported lazily; the VAE is always built from a config dict and a state dict, never from the hub.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from .layout import VAE_MEAN_KEY, VAE_STD_KEY
from .weights import build_with_weights

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

# Per-channel statistics of EQ-SDXL-VAE latents: x_model = (z - mean) / std.
EQVAE_MEAN = (-3.865960634760459, -1.3353925720045965, 0.8353661802812418, 0.909888159310023)
EQVAE_STD = (10.036514488374861, 6.848430044716239, 7.213817552213277, 5.591315799887989)

# diffusers AutoencoderKL config of the SDXL VAE (83,653,863 parameters). scaling_factor is unused by HDM.
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)

AUTO_TILE_PIXELS = 2048 * 2048  # decode() tiles automatically above this many output pixels
AUTO_TILE_SIZE = 1024  # pixel tile size used by automatic tiling
# Seeded random VAEs for tests, demos and benchmarks: AutoencoderKL overrides of SDXL_VAE_CONFIG.
VAE_PRESETS: dict[str, dict] = {
    "sdxl": {},
    "tiny": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),  # 8x downscale, 4 channels
}


# --------------------------------------------------------------------------------------------------------
# State dicts and config
# --------------------------------------------------------------------------------------------------------


def infer_vae_config(sd: dict[str, torch.Tensor], norm_num_groups: int = 32) -> dict:
    """AutoencoderKL config read from the tensor shapes of a bare diffusers VAE state dict (groups cannot be read)."""
    n_blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    channels = [int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n_blocks)]
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    if any(c % norm_num_groups for c in channels):
        raise ValueError(
            f"block_out_channels {channels} are not divisible by {norm_num_groups} norm groups; pass "
            "config={'norm_num_groups': g} with the group count the VAE was trained with"
        )
    return {
        **SDXL_VAE_CONFIG,
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * n_blocks,
        "block_out_channels": channels,
        "layers_per_block": len(layers),
        "norm_num_groups": norm_num_groups,
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in sd),
    }


def build_autoencoder(config: dict | None = None, *, device: torch.device | str = "cpu") -> AutoencoderKL:
    """diffusers AutoencoderKL from SDXL_VAE_CONFIG overridden by `config` (random init, or device="meta")."""
    from diffusers import AutoencoderKL

    config = {**SDXL_VAE_CONFIG, **(config or {})}
    with torch.device(device):
        return AutoencoderKL(**config)


def channel_stats(value: torch.Tensor | None, default: tuple[float, ...], name: str, channels: int = 4) -> torch.Tensor:
    """Per-channel statistic as a float32 [1, C, 1, 1] tensor, validated against the latent channel count."""
    t = torch.tensor(default) if value is None else value.detach().float().cpu()
    if t.numel() != channels:
        raise ValueError(
            f"{name} has {t.numel()} values but the VAE has {channels} latent channels; check the checkpoint"
        )
    return t.reshape(1, channels, 1, 1).float()


# --------------------------------------------------------------------------------------------------------
# Latent VAE
# --------------------------------------------------------------------------------------------------------


class LatentVAE(torch.nn.Module):
    """AutoencoderKL + HDM normalisation: encode images in [-1, 1] to model latents, decode to [0, 1] images."""

    def __init__(self, vae: AutoencoderKL, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        c = self.latent_channels
        self.register_buffer("mean", channel_stats(mean, EQVAE_MEAN, VAE_MEAN_KEY, c).to(self._device))
        self.register_buffer("std", channel_stats(std, EQVAE_STD, VAE_STD_KEY, c).to(self._device))

    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        *,
        config: dict | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LatentVAE:
        """Build from bare diffusers AutoencoderKL weights (`hdm_core.layout.vae_part` finds them in any file);
        `config` overrides the config inferred from the shapes."""
        if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in sd):
            raise ValueError(
                "the VAE keys use the original LDM naming (e.g. 'encoder.down.0.block.0...'), which is not supported "
                "here; convert the VAE to diffusers naming (encoder.down_blocks.*) or use the EQ-SDXL-VAE file")
        config = config or {}
        full = {**infer_vae_config(sd, config.get("norm_num_groups", 32)), **config}
        ref = sd["decoder.conv_in.weight"]
        vae = build_with_weights(lambda: build_autoencoder(full, device="meta"), sd, dtype=dtype or ref.dtype,
                                 device=torch.device(device) if device is not None else ref.device,
                                 what=f"VAE state dict does not match config {full} (pass the right config)")
        return cls(vae, mean, std)

    @property
    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the VAE weights."""
        return next(self.vae.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        """Number of latent channels (4 for EQ-SDXL-VAE)."""
        return int(self.vae.config.latent_channels)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for SDXL)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> model space: (z - mean) / std per channel."""
        return ((z.float() - self.mean.float()) / self.std.float()).to(z.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> raw VAE latents: x * std + mean per channel."""
        return (x.float() * self.std.float() + self.mean.float()).to(x.dtype)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> normalised latents; posterior sample (training) or mode."""
        posterior = self.vae.encode(images.to(device=self._device, dtype=self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return self.normalize(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Normalised latents -> float32 images [B, 3, H, W] in [0, 1]; tile=pixel tile size, 0 = never tile."""
        z = self.denormalize(latents.to(self._device).float()).to(self.dtype)
        pixels = z.shape[-2] * z.shape[-1] * self.downscale_factor**2
        if tile is None:
            tile = AUTO_TILE_SIZE if pixels > AUTO_TILE_PIXELS else 0
        dec = self._tiled_decode(z, tile) if tile else self.vae.decode(z, return_dict=False)[0]
        return (dec.float() / 2 + 0.5).clamp(0, 1)

    def _tiled_decode(self, z: torch.Tensor, tile: int) -> torch.Tensor:
        """diffusers' overlapping-tile decode with `tile`-pixel tiles (25 % overlap, linear blending)."""
        f = self.downscale_factor
        if tile % f or tile < 2 * f:
            raise ValueError(f"tile {tile} must be a multiple of {f} px and >= {2 * f}; e.g. tile=1024")
        vae = self.vae
        saved = vae.tile_sample_min_size, vae.tile_latent_min_size
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // self.downscale_factor
        try:
            return vae.tiled_decode(z, return_dict=False)[0]
        finally:
            vae.tile_sample_min_size, vae.tile_latent_min_size = saved


# --------------------------------------------------------------------------------------------------------
# Pixel space
# --------------------------------------------------------------------------------------------------------


class PixelSpace(torch.nn.Module):
    """Identity "VAE" for pixel-space models: the latent is the image in [-1, 1] with 3 channels."""

    latent_channels = 3
    downscale_factor = 1

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Identity (pixel latents need no normalisation)."""
        return z

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Identity (pixel latents need no normalisation)."""
        return x

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (i.e. pixel*2-1) -> the same tensor as latents."""
        return images.clone()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Latents in [-1, 1] -> float32 images in [0, 1]: clamp(x/2 + 0.5, 0, 1)."""
        return (latents.float() / 2 + 0.5).clamp(0, 1)
