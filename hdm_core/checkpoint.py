"""HDM checkpoint files: open them (safetensors, or pickles only when asked), build hdm_core modules from the
parts `hdm_core.layout` finds in them, and save the released single-file layout."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cli import is_pickle, refuse_pickle
from .config import XUTConfig
from .layout import (
    CONFIG_METADATA_KEY,
    PIXEL_SPACE_KEY,
    STAT_KEYS,
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

FINGERPRINT_VERSION = "hdm-fp1"
FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS = 1 << 16, 16
MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit on its JSON header


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
        if is_pickle(self.path):
            if not allow_pickle:
                refuse_pickle(self.path, "convert it to .safetensors, or pass allow_pickle=True (CLI: "
                                         "--allow-pickle) if you trust its source")
            state = load_weights_only(self.path)
            state = state["state_dict"] if isinstance(state.get("state_dict"), Mapping) else state
            self._tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
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


def load_weights_only(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in a torch pickle, read with torch.load(weights_only=True); `CheckpointError` naming the file when
    torch refuses it (it holds objects other than tensors), cannot read it, or it holds no dict."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        if "Weights only load failed" in str(err):  # torch's refusal of a pickle of other objects
            raise CheckpointError(f"{path.name} holds objects other than tensors, which weights-only loading "
                                  f"refuses because they could run code; save its state dict (tensors only) from "
                                  f"the tool that made it, as .safetensors") from None
        raise CheckpointError(f"{path.name} ({path.stat().st_size:,} bytes) is not a readable torch file "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'empty'}); "
                              f"it is probably truncated or corrupt") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path.name} holds a {type(state).__name__}, not a dict of tensors")
    return dict(state)


def fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a file of any size → "hdm-fp1:<sha256 hex>": sha256 over its size, its safetensors header
    (every tensor's name, dtype, shape and offset, and the metadata; the first 1 MiB of a file that is not
    safetensors) and 16 blocks of 64 KiB spread evenly over the rest, the first and last included. About 1 MiB is
    read whatever the size. Another model, another dtype, a merged or re-exported file (its metadata changes) or a
    changed tensor under a sampled block gives another fingerprint; a change confined to bytes between the blocks,
    with the same header and metadata, would not."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{FINGERPRINT_VERSION}:{size}:".encode())
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        start = 8 + n if 0 < n <= MAX_SAFETENSORS_HEADER and 8 + n <= size else min(size, 1 << 20)
        f.seek(0)
        digest.update(f.read(start))
        span = size - start
        if span <= FINGERPRINT_BLOCK * FINGERPRINT_BLOCKS:
            digest.update(f.read())
        else:
            for k in range(FINGERPRINT_BLOCKS):
                f.seek(start + k * (span - FINGERPRINT_BLOCK) // (FINGERPRINT_BLOCKS - 1))
                digest.update(f.read(FINGERPRINT_BLOCK))
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()}"


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
    for name, value in zip(STAT_KEYS, (vae_mean, vae_std)):
        if value is not None:
            tensors[name] = value.detach().float().reshape(1, -1, 1, 1).cpu().to(dtype or torch.float32)
    metadata = {CONFIG_METADATA_KEY: json.dumps(config.to_dict()), "format": "pt", **(extra_metadata or {})}
    _save(tensors, path, metadata)


def save_xut(path: str | os.PathLike, model: XUT, *, dtype: torch.dtype | None = None) -> None:
    """Save only the diffusion model (official names, no prefix) for the split layout."""
    _save(_prefixed("", model.state_dict(), dtype), path,
                {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict()), "format": "pt"})
