"""HDM checkpoint files: open them (safetensors, or pickles only when asked), build hdm_core modules from the
parts `hdm_core.layout` finds in them, and save the released single-file layout."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import XUTConfig
from .layout import (
    CONFIG_METADATA_KEY,
    PIXEL_SPACE_KEY,
    TE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    find_text_encoder,
    find_vae,
    is_pixel_space,
    text_encoder_part,
    vae_part,
    vae_stats,
    xut_part,
)
from .weights import CheckpointError, atomic_write, build_with_weights
from .xut import XUT

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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

class SafetensorsFile(Mapping):
    """Lazy mapping view of a checkpoint file: keys and metadata now, each tensor read (memory-mapped) and cast
    to `dtype` (floating tensors; None keeps the file's) when it is looked up."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
        self.path, self.dtype = Path(path), None
        if self.path.is_dir():
            raise CheckpointError(f"{self.path} is a folder; pass the .safetensors file inside it")
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        self._tensors, self.metadata = None, {}
        if self.path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.path.name} is a pickle file, which can run arbitrary code when loaded; convert it "
                    f"to .safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source")
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            self._tensors = state.get("state_dict", state)
            self._keys = list(self._tensors)
        else:
            try:
                self._file = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(
                    f"{self.path.name} ({self.path.stat().st_size:,} bytes) is not a readable safetensors file "
                    f"({err}); it is probably truncated or corrupt: download or copy it again") from err
            self.metadata = self._file.metadata() or {}
            self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def cast(self, dtype: torch.dtype | None) -> SafetensorsFile:
        """The same file, its floating tensors read as `dtype` (one at a time: no second full copy)."""
        view = object.__new__(SafetensorsFile)
        view.__dict__.update(self.__dict__, dtype=dtype)
        return view

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        try:
            tensor = self._tensors[key] if self._tensors is not None else self._file.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"tensor {key!r} in {self.path.name} cannot be read ({err}); the file is "
                                  f"truncated or corrupt: download or copy it again") from err
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def build_xut(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, ops: Any = torch.nn,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              name: str = "checkpoint") -> XUT:
    """An XUT holding exactly the XUT tensors of `sd` (any layout; built on meta and assigned, nothing copied)."""
    xut, config = xut_part(sd, metadata, name)
    return build_with_weights(lambda: XUT(config, ops=ops), xut, dtype=dtype, device=device,
                              what=f"XUT weights do not match config {config.to_dict()} (the file is damaged or of "
                                   f"another XUT variant; check its config metadata)")


def load_xut(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             allow_pickle: bool = False) -> XUT:
    """Load the diffusion model from a single-file or diffusion-model-only checkpoint."""
    f = SafetensorsFile(path, allow_pickle=allow_pickle)
    return build_xut(f.cast(dtype), f.metadata, device=device, name=f.path.name)


def read_text_encoder(f: SafetensorsFile, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> Any:
    """The Qwen3 text encoder of a single file (its tensors read alone) or of a text-encoder file."""
    from .text_encoder import TextEncoder

    sd, config = text_encoder_part(f.cast(dtype), f.path.name)
    return TextEncoder.from_state_dict(sd, config, dtype=dtype, device=device)


def read_vae(f: SafetensorsFile, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> Any:
    """The VAE of a single file or of a VAE file, with the file's latent statistics (or PixelSpace)."""
    from .vae import LatentVAE, PixelSpace

    if is_pixel_space(f):
        return PixelSpace()
    return LatentVAE.from_state_dict(vae_part(f.cast(dtype), f.path.name), *vae_stats(f), dtype=dtype,
                                     device=device)


def load_components(checkpoint: str | os.PathLike | None = None, *, diffusion_model: str | os.PathLike | None = None,
                    text_encoder: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    allow_pickle: bool = False) -> HDMComponents:
    """Load a single-file checkpoint and/or split files (a split file overrides that part of the single file)."""
    from .vae import PixelSpace

    if checkpoint is None and diffusion_model is None:
        raise CheckpointError("no diffusion model given: pass a single-file checkpoint or a diffusion_model file")
    open_file = lambda p: SafetensorsFile(p, allow_pickle=allow_pickle) if p is not None else None  # noqa: E731
    single = open_file(checkpoint)
    dm = open_file(diffusion_model) or single
    model = build_xut(dm.cast(dtype), dm.metadata, device=device, name=dm.path.name)

    te_file = open_file(text_encoder) or (single if single is not None and find_text_encoder(single) else None)
    te = read_text_encoder(te_file, dtype=dtype, device=device) if te_file is not None else None

    vae_file, decoder = open_file(vae), None
    if vae_file is None and single is not None:
        if find_vae(single) is not None or is_pixel_space(single):
            vae_file = single
        elif model.config.input_dim == 3:
            decoder = PixelSpace()
    if vae_file is not None:
        # The SDXL VAE overflows in fp16; it runs in fp32, or bf16 when asked for.
        vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        decoder = read_vae(vae_file, dtype=vae_dtype, device=device)
    return HDMComponents(model=model, config=model.config, text_encoder=te, vae=decoder)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def _prefixed(prefix: str, sd: Mapping[str, torch.Tensor] | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if not sd:
        return {}
    return {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in sd.items()}


def _save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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
    _save(tensors, path, metadata)


def save_xut(path: str | os.PathLike, model: XUT, *, dtype: torch.dtype | None = None) -> None:
    """Save only the diffusion model (official names, no prefix) for the split layout."""
    _save(_prefixed("", model.state_dict(), dtype), path,
                {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()), "format": "pt"})
