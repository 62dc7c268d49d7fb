"""XUT configuration: the official arch-JSON fields as frozen dataclasses, named presets, and inference
of the configuration from a state dict (so any checkpoint of this family loads without a side file)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# Official arch-JSON flags that the released family never changes. A config that sets one of them to
# another value describes a model this implementation does not build, so it is rejected, not ignored.
_FIXED_FLAGS = {
    "dec_ctx": False,
    "class_cond": 0,
    "shared_adaln": True,
    "concat_ctx": True,
    "use_dyt": False,
    "double_t": False,
}


@dataclass(frozen=True)
class TreadConfig:
    """Number of always-run blocks before / after the routed backbone, and the training routing rate."""

    prev_trns_depth: int = 1
    post_trns_depth: int = 3
    dropout_ratio: float = 0.5


@dataclass(frozen=True)
class XUTConfig:
    """Shape of an XUT (Cross-U-Transformer) backbone; field names follow the official arch JSON."""

    patch_size: int = 2
    input_dim: int = 4
    dim: int = 1024
    ctx_dim: int = 1024
    ctx_size: int = 256
    heads: int = 16  # informational only: the head count is dim // dim_head (SPEC §2.1)
    dim_head: int = 64
    mlp_dim: int = 3072
    depth: int = 4
    enc_blocks: int = 1
    dec_blocks: int = 3
    tread_config: TreadConfig = field(default_factory=TreadConfig)
    addon_info_embs_dim: int = 1

    def __post_init__(self) -> None:
        if self.dim % self.dim_head:
            raise ValueError(f"dim {self.dim} is not a multiple of dim_head {self.dim_head}")
        if self.dec_blocks < 1 or self.depth < 1 or self.enc_blocks < 1:
            raise ValueError(f"depth, enc_blocks and dec_blocks must be >= 1, got {self.depth}, "
                             f"{self.enc_blocks}, {self.dec_blocks}")

    @property
    def num_heads(self) -> int:
        return self.dim // self.dim_head

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> XUTConfig:
        """Build from an official arch JSON (or our own `to_dict`); unknown keys are an error."""
        d = dict(d)
        for flag, supported in _FIXED_FLAGS.items():
            if flag in d and d.pop(flag) != supported:
                raise ValueError(f"arch field {flag!r} must be {supported!r} for HDM/XUT checkpoints")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown XUT config keys {unknown}; expected a subset of {sorted(names)}")
        tread = d.get("tread_config")
        if isinstance(tread, Mapping):
            d["tread_config"] = TreadConfig(**tread)
        elif tread is None:
            d.pop("tread_config", None)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> XUTConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, XUTConfig] = {
    # The released 343M model (official file name: config/arch/xut-small-1024-tread.json).
    "xut-base": XUTConfig(),
    "xut-large": XUTConfig(dim=1280, ctx_dim=1152, heads=10, dim_head=128, mlp_dim=4096),
    "xut-small": XUTConfig(dim=896, ctx_dim=640, heads=14, dim_head=64, mlp_dim=3072, dec_blocks=2),
    # Tests and the CPU demo.
    "xut-tiny": XUTConfig(dim=64, ctx_dim=48, ctx_size=8, heads=2, dim_head=32, mlp_dim=128, depth=2,
                          dec_blocks=2, tread_config=TreadConfig(1, 2, 0.5)),
}


def latent_size(width: int, height: int, *, downscale: int, patch: int,
                round_down: bool = False) -> tuple[int, int]:
    """Latent (height, width) of a pixel size. Pixel sides must be multiples of downscale × patch (SPEC §1:
    16 px for the EQ-VAE): `round_down` rounds down with a warning (as the official pipeline), else ValueError."""
    unit = downscale * patch
    if width < unit or height < unit:
        raise ValueError(f"image size {width}x{height} is too small: both sides must be at least {unit} px")
    if width % unit or height % unit:
        if not round_down:
            near = [max(unit, round(s / unit) * unit) for s in (width, height)]
            raise ValueError(f"{width}x{height} is not a multiple of {unit} px (VAE factor {downscale} × patch "
                             f"{patch}); use e.g. {near[0]}x{near[1]}")
        warnings.warn(f"{width}x{height} is not a multiple of {unit} px; generating "
                      f"{width // unit * unit}x{height // unit * unit} instead", stacklevel=3)
    return patch * (height // unit), patch * (width // unit)


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(sd: Mapping[str, torch.Tensor], ctx_size: int = 256) -> XUTConfig:
    """Derive the configuration from the keys and shapes of an XUT state dict (official names, no prefix)."""
    keys = list(sd)
    need = ["in_patch.proj.weight", "ctx_proj.weight", "backbone.enc_blocks.0.0.attn.rope.freqs",
            "backbone.enc_blocks.0.0.mlp.w3.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not an XUT state dict: missing {missing}; first keys found: {keys[:5]}")
    dim, input_dim, patch, _ = sd["in_patch.proj.weight"].shape
    heads = sd["backbone.enc_blocks.0.0.attn.rope.freqs"].shape[0]
    addon = sd.get("addon_info_embs_proj.0.weight")
    return XUTConfig(
        patch_size=patch,
        input_dim=input_dim,
        dim=dim,
        ctx_dim=sd["ctx_proj.weight"].shape[1],
        ctx_size=ctx_size,
        heads=heads,
        dim_head=dim // heads,
        mlp_dim=sd["backbone.enc_blocks.0.0.mlp.w3.weight"].shape[1],
        depth=_count(keys, r"backbone\.enc_blocks\.(\d+)\."),
        enc_blocks=_count(keys, r"backbone\.enc_blocks\.0\.(\d+)\."),
        dec_blocks=_count(keys, r"backbone\.dec_blocks\.0\.(\d+)\."),
        tread_config=TreadConfig(
            prev_trns_depth=_count(keys, r"prev_tread_trns\.blocks\.(\d+)\."),
            post_trns_depth=_count(keys, r"post_tread_trns\.blocks\.(\d+)\."),
        ),
        addon_info_embs_dim=0 if addon is None else addon.shape[1],
    )
