"""The frozen encoders named by a recipe: Qwen3 text encoder and VAE, from a file or randomly initialised.

Sources (recipe `model.text_encoder` / `model.vae`):
- a path: the released single file (`te.text_models.0.*`, `vae.*`), a Qwen3 / Qwen3ForCausalLM safetensors, or a
  diffusers AutoencoderKL safetensors;
- "random:<spec>": frozen weights drawn from a seeded generator, for tests, demos and benchmarks. <spec> is a
  preset name and/or comma-separated key=value pairs, e.g. "random:tiny", "random:tiny,seed=3",
  "random:hidden_size=64,num_hidden_layers=2" (text encoder) or "random:sdxl" (VAE, a random EQ-VAE-shaped model);
- "pixel" (VAE only): pixel space, the latent is the image in [-1, 1] (XUT input_dim 3).
The same spec and seed always give the same weights, and an export stores them, so a reload matches.
"""

from __future__ import annotations

from typing import Any

import torch

from hdm_core.checkpoint import SafetensorsFile, read_text_encoder, read_vae
from hdm_core.text_encoder import QWEN3_PRESETS, TextEncoder, build_qwen3
from hdm_core.vae import VAE_PRESETS, LatentVAE, PixelSpace, build_autoencoder

from .recipe import parse_value

# "random:<preset>" names: the presets hdm_core builds its tiny test encoders from.
RANDOM_TEXT_ENCODERS: dict[str, dict[str, Any]] = QWEN3_PRESETS   # "tiny" (xut-tiny's ctx_dim 48), "qwen3-0.6b"
RANDOM_VAES: dict[str, dict[str, Any]] = VAE_PRESETS               # "tiny" (8x, 4 channels), "sdxl"


def parse_random_spec(spec: str, presets: dict[str, dict]) -> tuple[dict[str, Any], int]:
    """'random:tiny,seed=3,num_hidden_layers=4' → (config overrides, seed)."""
    body = spec.split(":", 1)[1]
    config: dict[str, Any] = {}
    seed = 0
    for part in (p.strip() for p in body.split(",") if p.strip()):
        if "=" not in part:
            if part not in presets:
                raise ValueError(f"unknown random preset {part!r} in {spec!r}; known: {sorted(presets)}")
            config.update(presets[part])
            continue
        key, raw = (s.strip() for s in part.split("=", 1))
        value = parse_value(raw)
        if key == "seed":
            seed = int(value)
        else:
            config[key] = value
    return config, seed


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def _seeded(seed: int, build: Any) -> Any:
    """build() with the global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_text_encoder(source: str, dtype: torch.dtype, device: torch.device) -> Any:
    """A frozen hdm_core TextEncoder from a path or a "random:" spec."""
    if not source:
        raise ValueError("model.text_encoder is empty; set it to the released checkpoint, a Qwen3-0.6B "
                         "safetensors file, or 'random:tiny' for a CPU test run")
    if source.startswith("random:"):
        config, seed = parse_random_spec(source, RANDOM_TEXT_ENCODERS)
        model = _seeded(seed, lambda: build_qwen3(config, dtype=torch.float32, device="cpu"))
        return _frozen(TextEncoder(model.to(device=device, dtype=dtype)))
    return _frozen(read_text_encoder(SafetensorsFile(source), dtype=dtype, device=device))


def build_vae(source: str, dtype: torch.dtype, device: torch.device) -> Any:
    """A frozen LatentVAE (or PixelSpace for "pixel") from a path or a "random:" spec."""
    if source == "pixel":
        return PixelSpace()
    if not source:
        raise ValueError("model.vae is empty; set it to the released checkpoint or an EQ-SDXL-VAE safetensors "
                         "file, 'pixel' for pixel space, or 'random:tiny' for a CPU test run")
    if source.startswith("random:"):
        config, seed = parse_random_spec(source, RANDOM_VAES)
        vae = _seeded(seed, lambda: build_autoencoder(config, device="cpu"))
        return _frozen(LatentVAE(vae.to(device=device, dtype=dtype)))
    return _frozen(read_vae(SafetensorsFile(source), dtype=dtype, device=device))


def vae_export_parts(vae: Any) -> dict[str, Any]:
    """Keyword arguments of hdm_core.checkpoint.save_single_file that store this VAE."""
    if getattr(vae, "downscale_factor", None) == 1 and not hasattr(vae, "vae"):
        return {"pixel_space": True}
    return {"vae_sd": vae.vae.state_dict(), "vae_mean": vae.mean, "vae_std": vae.std}
