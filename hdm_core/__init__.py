"""hdm_core: a weights-compatible HDM (Home-made Diffusion Model) inference library in pure PyTorch."""

from .adapters import adapters_applied, apply_adapters, load_adapter, save_adapter
from .canvas import Camera, Region, Tiling, canvas_position_map, tile_regions
from .config import PRESETS, TreadConfig, XUTConfig, infer_config
from .rope import aspect_info, downsample_pos, make_axial_pos
from .tread import (
    gather_tokens,
    keep_count,
    keep_index,
    random_keep_index,
    random_keep_mask,
    restore_tokens,
    select_tokens,
)
from .xut import XUT

__all__ = [
    "adapters_applied", "apply_adapters", "load_adapter", "save_adapter", "PRESETS", "TreadConfig", "XUTConfig",
    "infer_config", "XUT",
    "Camera", "Region", "Tiling", "canvas_position_map", "tile_regions", "aspect_info", "downsample_pos",
    "make_axial_pos",
    "gather_tokens", "keep_count", "keep_index", "random_keep_index", "random_keep_mask", "restore_tokens",
    "select_tokens",
]
