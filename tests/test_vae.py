"""LatentVAE / PixelSpace: normalisation, state-dict layouts, decode range, tiling, on a tiny AutoencoderKL."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import hdm_core.vae as vae_module
from hdm_core.layout import CheckpointError, vae_part, vae_stats
from hdm_core.vae import (
    EQVAE_MEAN,
    EQVAE_STD,
    SDXL_VAE_CONFIG,
    LatentVAE,
    PixelSpace,
    build_autoencoder,
    infer_vae_config,
)

# Deliberately not the "tiny" preset: 16 channels cannot hold the default 32 norm groups (see below).
TINY = dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_autoencoder(TINY).state_dict().items()}


@pytest.fixture(scope="module")
def tiny_vae(tiny_sd) -> LatentVAE:
    return LatentVAE.from_state_dict(tiny_sd, config={"norm_num_groups": 8})


def test_sdxl_config_matches_released_layout():
    vae = build_autoencoder(SDXL_VAE_CONFIG, device="meta")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert len(vae.state_dict()) == 248
    inferred = infer_vae_config(vae.state_dict())
    assert {k: inferred[k] for k in SDXL_VAE_CONFIG} == SDXL_VAE_CONFIG


def test_infer_config_reads_tiny_shapes(tiny_sd):
    cfg = infer_vae_config(tiny_sd, norm_num_groups=8)
    assert cfg["block_out_channels"] == [16, 32]
    assert cfg["layers_per_block"] == 1 and cfg["latent_channels"] == 4
    with pytest.raises(ValueError, match="norm_num_groups"):
        infer_vae_config(tiny_sd)  # 16 channels cannot hold 32 groups: the caller must say


def test_normalize_round_trip_and_eqvae_defaults(tiny_vae):
    assert tiny_vae.mean.flatten().tolist() == pytest.approx(EQVAE_MEAN)
    assert tiny_vae.std.flatten().tolist() == pytest.approx(EQVAE_STD)
    z = torch.randn(2, 4, 5, 6) * 8
    x = tiny_vae.normalize(z)
    torch.testing.assert_close(x[:, 0], (z[:, 0] - EQVAE_MEAN[0]) / EQVAE_STD[0])
    torch.testing.assert_close(tiny_vae.denormalize(x), z)


def test_mean_std_read_from_checkpoint(tiny_sd):
    mean, std = torch.tensor([1.0, 2, 3, 4]).view(1, 4, 1, 1), torch.tensor([2.0, 3, 4, 5]).view(1, 4, 1, 1)
    sd = {**tiny_sd, "vae_mean": mean, "vae_std": std}
    vae = LatentVAE.from_state_dict(vae_part(sd), *vae_stats(sd), config={"norm_num_groups": 8})
    torch.testing.assert_close(vae.mean, mean)
    got = vae.normalize(torch.ones(1, 4, 2, 2))[0, :, 0, 0]
    torch.testing.assert_close(got, torch.tensor([0.0, -1 / 3, -0.5, -0.6]))


@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model.", ""])
def test_prefixed_state_dict_loads(prefix, tiny_sd, tiny_vae, tmp_path):
    sd = {f"{prefix}{k}": v for k, v in tiny_sd.items()}
    sd["unet.model.x.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "vae.safetensors")
    loaded = load_file(tmp_path / "vae.safetensors")
    assert vae_part(loaded).keys() == tiny_sd.keys()
    vae = LatentVAE.from_state_dict(vae_part(loaded), config={"norm_num_groups": 8})
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(vae.decode(z), tiny_vae.decode(z), rtol=0, atol=1e-6)


def test_bad_state_dicts_raise():
    with pytest.raises(CheckpointError, match=r"first keys are \['foo.weight'\]"):
        vae_part({"foo.weight": torch.zeros(1)})
    ldm = {f"first_stage_model.{k}": torch.zeros(1) for k in ("encoder.down.0.block.0.conv1.weight",
                                                             "decoder.conv_in.weight")}
    with pytest.raises(ValueError, match="LDM naming"):
        LatentVAE.from_state_dict(vae_part(ldm))


def test_encode_decode_shapes_and_range(tiny_vae):
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    lat = tiny_vae.encode(images, generator=gen())
    assert lat.shape == (2, 4, 16, 24) and tiny_vae.downscale_factor == 2
    torch.testing.assert_close(tiny_vae.encode(images, generator=gen()), lat)  # sampling is seeded
    mode = tiny_vae.encode(images, sample=False)
    assert not torch.equal(mode, lat)
    out = tiny_vae.decode(lat * 10)
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_tiled_decode_close_to_untiled(tiny_vae, monkeypatch):
    z = torch.randn(1, 4, 32, 48)
    full = tiny_vae.decode(z)
    tiled = tiny_vae.decode(z, tile=64)
    assert tiled.shape == full.shape
    assert (tiled - full).abs().mean() < 0.02  # GroupNorm statistics are per tile, so not exact
    torch.testing.assert_close(tiny_vae.decode(z, tile=128), full)  # one tile covering all == untiled
    monkeypatch.setattr(vae_module, "AUTO_TILE_PIXELS", 32 * 32)
    monkeypatch.setattr(vae_module, "AUTO_TILE_SIZE", 64)
    torch.testing.assert_close(tiny_vae.decode(z), tiled)  # large images tile automatically
    torch.testing.assert_close(tiny_vae.decode(z, tile=0), full)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny_vae.decode(z, tile=33)


def test_pixel_space_round_trip():
    px = PixelSpace()
    images01 = torch.rand(2, 3, 8, 12)
    lat = px.encode(images01 * 2 - 1)
    assert lat.shape == (2, 3, 8, 12) and px.latent_channels == 3 and px.downscale_factor == 1
    torch.testing.assert_close(px.decode(lat), images01)
    assert px.decode(torch.full((1, 3, 2, 2), 5.0)).max() == 1
