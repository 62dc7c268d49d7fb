"""The frozen encoders named by a recipe: Qwen3 text encoder and VAE, from a file or randomly initialised.

Sources (recipe `model.text_encoder` / `model.vae`):
- empty: the base model's file (`model.init_from`), so a fine-tune names its base once;
- a path: the released single file (`te.text_models.0.*`, `vae.*`), a Qwen3 / Qwen3ForCausalLM safetensors, or a
  diffusers AutoencoderKL safetensors;
- "random:<spec>": frozen weights drawn from a seeded generator, for tests, demos and benchmarks. <spec> is a
  preset name and/or comma-separated key=value pairs, e.g. "random:tiny", "random:tiny,seed=3",
  "random:hidden_size=64,num_hidden_layers=2" (text encoder) or "random:sdxl" (VAE, a random EQ-VAE-shaped model);
- "pixel" (VAE only): pixel space, the latent is the image in [-1, 1] (XUT input_dim 3).
The same spec and seed always give the same weights, and an export stores them, so a reload matches. A spec whose
sizes are not positive whole numbers, or that asks for more than MAX_RANDOM_PARAMS, is refused before anything is
allocated. Errors name the recipe key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hdm_core.checkpoint import SafetensorsFile, read_text_encoder, read_vae
from hdm_core.cli import one_line
from hdm_core.text_encoder import QWEN3_PRESETS, TextEncoder, build_qwen3
from hdm_core.vae import VAE_PRESETS, LatentVAE, PixelSpace, build_autoencoder
from hdm_core.weights import DTYPES

from .recipe import ModelSection, parse_value

Vae = LatentVAE | PixelSpace  # what a recipe's model.vae builds
MAX_RANDOM_PARAMS = 2_000_000_000  # "random:qwen3-0.6b" (0.6 G) is the largest a test or benchmark asks for


@dataclass(frozen=True)
class Encoders:
    """The frozen encoders of a run: the text encoder (a Qwen3) and the VAE (or pixel space)."""

    text: TextEncoder
    vae: Vae

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


def _checked_random(spec: str, build_meta: Callable[[], torch.nn.Module]) -> None:
    """ValueError when a "random:" spec cannot be built (a size that is negative, zero, not a number or too large to
    represent) or asks for more than MAX_RANDOM_PARAMS; checked on the meta device, nothing allocated."""
    try:
        n = sum(p.numel() for p in build_meta().parameters())
    except (RuntimeError, ValueError, TypeError, OverflowError, ZeroDivisionError) as err:
        raise ValueError(f"{spec!r} cannot be built ({one_line(err)[:200]}); its sizes must be positive whole "
                         f"numbers") from None
    if n > MAX_RANDOM_PARAMS:
        raise ValueError(f"{spec!r} asks for {n:,} parameters ({n * 4 / 2**30:.0f} GiB in fp32), more than "
                         f"{MAX_RANDOM_PARAMS:,}; random encoders are for tests and demos: lower its sizes")


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def _seeded(seed: int, build: Any) -> Any:
    """build() with the global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_text_encoder(source: str, dtype: torch.dtype, device: torch.device) -> TextEncoder:
    """A frozen hdm_core TextEncoder from a path or a "random:" spec."""
    if not source:
        raise ValueError("model.text_encoder is empty; set it (or model.init_from, which it then follows) to the "
                         "released checkpoint, a Qwen3-0.6B safetensors file, or 'random:tiny' for a CPU test run")
    if source.startswith("random:"):
        config, seed = parse_random_spec(source, RANDOM_TEXT_ENCODERS)
        _checked_random(source, lambda: build_qwen3(config, device="meta"))
        model = _seeded(seed, lambda: build_qwen3(config, dtype=torch.float32, device="cpu"))
        return _frozen(TextEncoder(model.to(device=device, dtype=dtype)))
    return _frozen(read_text_encoder(SafetensorsFile(source), dtype=dtype, device=device))


def build_vae(source: str, dtype: torch.dtype, device: torch.device) -> Vae:
    """A frozen LatentVAE (or PixelSpace for "pixel") from a path or a "random:" spec."""
    if source == "pixel":
        return PixelSpace()
    if not source:
        raise ValueError("model.vae is empty; set it (or model.init_from, which it then follows) to the released "
                         "checkpoint or an EQ-SDXL-VAE safetensors file, 'pixel' for pixel space, or 'random:tiny' "
                         "for a CPU test run")
    if source.startswith("random:"):
        config, seed = parse_random_spec(source, RANDOM_VAES)
        _checked_random(source, lambda: build_autoencoder(config, device="meta"))
        vae = _seeded(seed, lambda: build_autoencoder(config, device="cpu"))
        return _frozen(LatentVAE(vae.to(device=device, dtype=dtype)))
    return _frozen(read_vae(SafetensorsFile(source), dtype=dtype, device=device))


def encoder_source(m: ModelSection, key: str, base_file: Path | None) -> tuple[str, str]:
    """(source, how errors name it) of `model.<key>` ("text_encoder" or "vae"): its own value, or when it is empty
    the base model's file (`base_file`, what model.init_from resolved to)."""
    own = getattr(m, key)
    if own or not m.init_from:
        return own, f"model.{key}"
    name = f"model.{key} (empty, so model.init_from's)"
    if base_file is None or base_file.suffix != ".safetensors":
        raise ValueError(f"{name}: model.init_from {m.init_from} is a training checkpoint, which holds no "
                         f"{key.replace('_', ' ')}; set model.{key} (e.g. to the released single file)")
    return str(base_file), name


def build_encoder(key: str, m: ModelSection, base_file: Path | None, device: torch.device) -> TextEncoder | Vae:
    """The frozen text encoder or VAE (`key`) a recipe names (see `encoder_source`); errors name the recipe key. On
    GPU in model.encoder_dtype, on the CPU in float32."""
    dtype = DTYPES[m.encoder_dtype] if device.type == "cuda" else torch.float32
    source, name = encoder_source(m, key, base_file)
    build = build_text_encoder if key == "text_encoder" else build_vae
    if not source:
        return build(source, dtype, device)  # its error says which keys to set
    try:
        return build(source, dtype, device)
    except ValueError as err:
        raise ValueError(f"{name}: {one_line(err)}") from err
    except OSError as err:
        raise OSError(f"{name}: {one_line(err)}") from err


def vae_export_parts(vae: Vae) -> dict[str, Any]:
    """Keyword arguments of hdm_core.checkpoint.save_single_file that store this VAE."""
    if getattr(vae, "downscale_factor", None) == 1 and not hasattr(vae, "vae"):
        return {"pixel_space": True}
    return {"vae_sd": vae.vae.state_dict(), "vae_mean": vae.mean, "vae_std": vae.std}
