"""HDM checkpoints: the released single-file layout (SPEC §8), split files, validation and saving.

Single file: `unet.model.*` (XUT, official names), `te.text_models.0.*` (Qwen3Model), `vae.*` (diffusers
AutoencoderKL) and `vae_mean` / `vae_std`. A pixel-space model stores the marker `vae.pixel_space_vae`
(the key ComfyUI uses to pick its pixel-space VAE). Our files also carry the XUT config as JSON metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import XUTConfig, infer_config
from .xut import XUT

UNET_PREFIX = "unet.model."
TE_PREFIX = "te.text_models.0."
VAE_PREFIX = "vae."
PIXEL_SPACE_KEY = "vae.pixel_space_vae"
CONFIG_METADATA_KEY = "hdm.xut_config"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Key fragments that identify checkpoints of other families, for a useful error message.
_OTHER_ARCHS = [
    ("model.diffusion_model.double_blocks.", "Flux"),
    ("double_blocks.0.img_attn.", "Flux"),
    ("model.diffusion_model.joint_blocks.", "SD3"),
    ("conditioner.embedders.1.", "SDXL"),
    ("model.diffusion_model.input_blocks.", "Stable Diffusion (UNet)"),
    ("model.diffusion_model.", "another ComfyUI diffusion model"),
    ("first_stage_model.", "an LDM checkpoint"),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message says what was found and what to do."""


@dataclass
class HDMComponents:
    """Everything generation needs; `text_encoder` / `vae` are None when the files did not provide them."""

    model: XUT
    config: XUTConfig
    text_encoder: Any = None  # hdm_core.text_encoder.TextEncoder
    vae: Any = None  # hdm_core.vae.LatentVAE or PixelSpace


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

class SafetensorsFile:
    """Lazy view of a safetensors file: keys and metadata now, tensors on demand (memory-mapped)."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        if self.path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.path.name} is a pickle file, which can run arbitrary code when loaded; convert it "
                    f"to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source")
            self._tensors = torch.load(self.path, map_location="cpu", weights_only=True)
            self._tensors = self._tensors.get("state_dict", self._tensors)
            self.metadata: dict[str, str] = {}
            self.keys = list(self._tensors)
            return
        self._tensors = None
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as err:
            size = self.path.stat().st_size
            raise CheckpointError(
                f"{self.path.name} ({size:,} bytes) is not a readable safetensors file ({err}); it is probably "
                f"truncated or corrupt: download or copy it again") from err
        self.metadata = self._file.metadata() or {}
        self.keys = list(self._file.keys())

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"tensor {key!r} in {self.path.name} cannot be read ({err}); the file is "
                                  f"truncated or corrupt: download or copy it again") from err

    def part(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors under `prefix`, prefix stripped, cast one at a time (no second full copy)."""
        out = {}
        for key in self.keys:
            if key.startswith(prefix):
                tensor = self.get(key)
                cast = dtype is not None and tensor.is_floating_point()
                out[key[len(prefix):]] = tensor.to(dtype) if cast else tensor
        return out

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)


def describe_architecture(keys: Iterable[str]) -> str:
    """A short guess of what family a non-HDM checkpoint belongs to."""
    keys = list(keys)
    for fragment, name in _OTHER_ARCHS:
        if any(k.startswith(fragment) for k in keys):
            return f"{name} (found keys starting with {fragment!r})"
    if any(k.startswith(("layers.0.self_attn.", "model.layers.0.self_attn.")) for k in keys):
        return "a text encoder only (Qwen/Llama-style keys)"
    if any(k.startswith(("decoder.up_blocks.", "decoder.up.")) for k in keys):
        return "a VAE only"
    return f"an unknown model (first keys: {keys[:5]})"


def _xut_prefix(f: SafetensorsFile) -> str:
    for prefix in (UNET_PREFIX, ""):
        if prefix + "in_patch.proj.weight" in f.keys:
            return prefix
    raise CheckpointError(
        f"{f.path.name} is not an HDM/XUT checkpoint: it looks like {describe_architecture(f.keys)}. HDM files "
        f"contain '{UNET_PREFIX}in_patch.proj.weight' (single file) or 'in_patch.proj.weight' (diffusion model only)")


def build_xut(sd: Mapping[str, torch.Tensor], config: XUTConfig | None = None, *, ops: Any = torch.nn,
              strict: bool = True) -> XUT:
    """An XUT holding exactly the tensors of `sd` (built on meta and assigned, so nothing is copied)."""
    config = config or infer_config(sd)
    with torch.device("meta"):
        model = XUT(config, ops=ops)
    expected = model.state_dict()
    mismatched = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
                  for k, v in sd.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if mismatched or missing or (strict and unexpected):
        raise CheckpointError(
            f"XUT weights do not match config {config.to_dict()}: {len(mismatched)} mismatched shapes "
            f"{mismatched[:3]}, {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}; the file is damaged or of another XUT variant (check its config metadata)")
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, assign=True)
    return model.eval()


def read_config(f: SafetensorsFile, sd: Mapping[str, torch.Tensor]) -> XUTConfig:
    """The config stored in the metadata, else the one inferred from shapes."""
    if CONFIG_METADATA_KEY in f.metadata:
        return XUTConfig.from_dict(json.loads(f.metadata[CONFIG_METADATA_KEY]))
    return infer_config(sd)


def load_xut(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             allow_pickle: bool = False) -> XUT:
    """Load the diffusion model from a single-file or diffusion-model-only checkpoint."""
    f = SafetensorsFile(path, allow_pickle=allow_pickle)
    sd = f.part(_xut_prefix(f), dtype)
    return build_xut(sd, read_config(f, sd)).to(device)


def read_text_encoder(f: SafetensorsFile, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> Any:
    """The Qwen3 text encoder of a single file (`te.text_models.0.*`, read alone) or of a text-encoder file."""
    from .text_encoder import TextEncoder

    sd = f.part(TE_PREFIX if f.has(TE_PREFIX) else "", dtype)
    return TextEncoder.from_state_dict(sd, dtype=dtype, device=device)


def read_vae(f: SafetensorsFile, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> Any:
    """The VAE of a single file (`vae.*` + `vae_mean`/`vae_std`) or of a VAE file, with its normalisation."""
    from .vae import LatentVAE

    sd = f.part(VAE_PREFIX if f.has(VAE_PREFIX) else "", dtype)
    sd.update({k: f.get(k) for k in ("vae_mean", "vae_std") if k in f.keys})
    return LatentVAE.from_state_dict(sd, dtype=dtype, device=device)


def load_components(checkpoint: str | os.PathLike | None = None, *, diffusion_model: str | os.PathLike | None = None,
                    text_encoder: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    allow_pickle: bool = False) -> HDMComponents:
    """Load a single-file checkpoint and/or split files (a split file overrides that part of the single file)."""
    from .vae import PixelSpace

    if checkpoint is None and diffusion_model is None:
        raise CheckpointError("no diffusion model given: pass a single-file checkpoint or a diffusion_model file")
    single = SafetensorsFile(checkpoint, allow_pickle=allow_pickle) if checkpoint is not None else None
    dm = SafetensorsFile(diffusion_model, allow_pickle=allow_pickle) if diffusion_model is not None else single
    sd = dm.part(_xut_prefix(dm), dtype)
    config = read_config(dm, sd)
    model = build_xut(sd, config).to(device)

    te_file = SafetensorsFile(text_encoder, allow_pickle=allow_pickle) if text_encoder is not None else single
    te = None
    if te_file is not None and (te_file is not single or te_file.has(TE_PREFIX)):
        te = read_text_encoder(te_file, dtype=dtype, device=device)

    vae_file = SafetensorsFile(vae, allow_pickle=allow_pickle) if vae is not None else single
    decoder = None
    if vae_file is not None:
        if PIXEL_SPACE_KEY in vae_file.keys or (vae_file is single and config.input_dim == 3
                                                and not vae_file.has(VAE_PREFIX)):
            decoder = PixelSpace()
        elif vae_file is not single or vae_file.has(VAE_PREFIX):
            # The SDXL VAE overflows in fp16; it runs in fp32, or bf16 when asked for.
            vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
            decoder = read_vae(vae_file, dtype=vae_dtype, device=device)
    return HDMComponents(model=model, config=config, text_encoder=te, vae=decoder)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def _prefixed(prefix: str, sd: Mapping[str, torch.Tensor] | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if not sd:
        return {}
    return {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in sd.items()}


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file via a temporary file and a rename, so a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_single_file(path: str | os.PathLike, model_sd: Mapping[str, torch.Tensor], config: XUTConfig, *,
                     te_sd: Mapping[str, torch.Tensor] | None = None, vae_sd: Mapping[str, torch.Tensor] | None = None,
                     vae_mean: torch.Tensor | None = None, vae_std: torch.Tensor | None = None,
                     pixel_space: bool = False, dtype: torch.dtype | None = None,
                     extra_metadata: Mapping[str, str] | None = None) -> None:
    """Save in the released single-file layout with the XUT config in the metadata (atomic)."""
    tensors = _prefixed(UNET_PREFIX, model_sd, dtype)
    tensors.update(_prefixed(TE_PREFIX, te_sd, dtype))
    tensors.update(_prefixed(VAE_PREFIX, vae_sd, dtype))
    if pixel_space:
        tensors[PIXEL_SPACE_KEY] = torch.tensor(1.0)
    for name, value in (("vae_mean", vae_mean), ("vae_std", vae_std)):
        if value is not None:
            tensors[name] = value.detach().float().reshape(1, -1, 1, 1).cpu().to(dtype or torch.float32)
    metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict()), "format": "pt", **(extra_metadata or {})}
    atomic_save(tensors, path, metadata)


def save_xut(path: str | os.PathLike, model: XUT, *, dtype: torch.dtype | None = None) -> None:
    """Save only the diffusion model (official names, no prefix) for the split layout."""
    atomic_save(_prefixed("", model.state_dict(), dtype), path,
                {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()), "format": "pt"})
