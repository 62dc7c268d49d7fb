"""Where each model call sits on the canvas (ComfyUI glue: imports ComfyUI at the top).

ComfyUI runs the model on part of the latent for an area prompt (ConditioningSetArea, ...Percentage, a mask with
set_area_to_bounds) and crops every noise-shaped cond with the area. `canvas_conds` therefore hands the model, per
conditioning, the canvas's cell indices as such a cond (integers, so ComfyUI never casts them to the model dtype)
and the canvas size; the cropped indices tell `call_positions` which region of the canvas a call covers, and it
builds that region's map exactly (`hdm_core.canvas.canvas_position_map`, in float32) through the camera.

What a region is given, chosen on the MODEL (`POSITIONS_OPTION` in transformer_options, set by HDM Area
Positions): "canvas" (default) = its slice of the canvas's map and the canvas's aspect, its true place in the
picture; "own" = the legacy behaviour, each region a picture of its own. ComfyUI's ScaleROPE (rope_options)
composes a camera on top (`rope_camera`).
"""

from __future__ import annotations

import functools
import logging

import comfy.conds
import torch

from ..hdm_core.canvas import CAMERA_KEYS, Camera, Region, Tiling, canvas_position_map
from ..hdm_core.rope import aspect_info

POSITIONS_OPTION = "hdm_positions"      # transformer_options key: "canvas" | "own"
POSITIONS = ("canvas", "own")
TILES_OPTION = "hdm_tiles"              # transformer_options key: hdm_core.canvas.Tiling (latent cells)
log = logging.getLogger(__name__)


def canvas_conds(noise: torch.Tensor | None) -> dict:
    """The model conds of a conditioning for a sampling run on `noise` [B, C, H, W]: cell indices [1, 2, H, W]
    (cropped with any area) and the canvas size [1, 2]."""
    if noise is None or noise.dim() != 4:
        return {}
    rows, cols = noise.shape[-2:]
    cells = torch.stack(torch.meshgrid(torch.arange(rows, dtype=torch.int32), torch.arange(cols, dtype=torch.int32),
                                       indexing="ij"))[None]                           # (1, 2, H, W)
    return {"canvas_cells": comfy.conds.CONDNoiseShape(cells),
            "canvas_size": comfy.conds.CONDRegular(torch.tensor([[rows, cols]], dtype=torch.int32))}


def cond_cameras(values: dict, batch: int) -> list[Camera]:
    """One Camera per sample from the x_shift / y_shift / zoom model conds ([B] tensors; identity when absent)."""
    if values.get("zoom") is None:
        return [Camera()] * batch
    columns = [values[k].float().reshape(-1).expand(batch).tolist() for k in CAMERA_KEYS]
    return [Camera(*frame) for frame in zip(*columns)]


def rope_camera(rope_options: dict | None, canvas: tuple[int, int], patch: int) -> Camera | None:
    """ComfyUI's ScaleROPE on HDM: positions become p·scale + shift·(one token), about the canvas centre, i.e. the
    camera Camera(shift·token/scale, zoom = 1/scale) composed after HDM Camera's; one token = one patch of the
    canvas (2·patch / long side in latent cells, 16 px for the released model). scale_t / shift_t have no
    meaning for images and are ignored."""
    if not rope_options:
        return None
    sx, sy = rope_options.get("scale_x", 1.0), rope_options.get("scale_y", 1.0)
    if sx != sy or not sx > 0:
        raise ValueError(f"ScaleROPE scale_x {sx} and scale_y {sy}: HDM's camera has one zoom (= 1 / scale), so "
                         f"set both to the same value > 0")
    if rope_options.get("scale_t", 1.0) != 1.0 or rope_options.get("shift_t", 0.0) != 0.0:
        _warn_time_scale()
    token = 2 * patch / max(canvas)
    return Camera(rope_options.get("shift_x", 0.0) * token / sx, rope_options.get("shift_y", 0.0) * token / sx,
                  1.0 / sx)


@functools.cache
def _warn_time_scale() -> None:  # once per session, not once per model call
    log.warning("ScaleROPE scale_t / shift_t have no effect on HDM (an image model)")


def _extend(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A map [h, w, 2] continued linearly to rows × cols (the model pads odd latents by one cell)."""
    for dim, size in ((0, rows), (1, cols)):
        while grid.shape[dim] < size:
            last = grid.narrow(dim, grid.shape[dim] - 1, 1)
            step = last - grid.narrow(dim, grid.shape[dim] - 2, 1) if grid.shape[dim] > 1 else 0 * last
            grid = torch.cat((grid, last + step), dim)
    return grid


def call_positions(x: torch.Tensor, conds: dict, transformer_options: dict, patch: int,
                   padded: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[Camera]]:
    """(pos_map [B, H·W, 2] at the padded size, aspect [B], cameras) for a model call on x [B, C, h, w]; the
    cameras are those of the conds followed by ScaleROPE's, as a tile drawn as its own picture needs them."""
    b, _, h, w = x.shape
    cameras = cond_cameras(conds, b)
    cells, size = conds.get("canvas_cells"), conds.get("canvas_size")
    # Conds made for another latent size than this call's (TrainLoraNode's multi-resolution and bucket modes build
    # them from the first picture) place nothing: the call is a picture of its own.
    own = (transformer_options.get(POSITIONS_OPTION, "canvas") == "own" or cells is None
           or tuple(cells.shape[-2:]) != (h, w))
    maps, aspects = [], []
    for i, camera in enumerate(cameras):
        canvas = (h, w) if own else tuple(size[min(i, size.shape[0] - 1)].tolist())
        region = None if own else Region(int(cells[i, 0, 0, 0]), int(cells[i, 1, 0, 0]), h, w)
        extra = rope_camera(transformer_options.get("rope_options"), canvas, patch)
        if extra is not None:
            cameras[i] = camera = camera.then(extra)
        grid = canvas_position_map(*canvas, camera, region, device=x.device).reshape(h, w, 2)
        maps.append(_extend(grid, *padded).reshape(-1, 2))
        aspects.append(aspect_info(*canvas))
    return torch.stack(maps), torch.tensor(aspects, device=x.device), cameras


# ---------------------------------------------------------------------------------------------------
# The MODEL patches of HDM Tiled Diffusion and HDM Area Positions
# ---------------------------------------------------------------------------------------------------

def _patched(model, node: str, key: str, value) -> object:
    """A clone of an HDM MODEL with transformer_options[key] = value (ValueError for another model)."""
    from .model import HDMModel

    if not isinstance(getattr(model, "model", None), HDMModel):
        raise ValueError(f"{node} needs an HDM MODEL (from an HDM loader), got {type(model.model).__name__}")
    patched = model.clone()
    patched.model_options.setdefault("transformer_options", {})[key] = value
    return patched


def tiled_model(model, tile_width: int, tile_height: int, overlap: int, tile_batch: int) -> object:
    """The model sampled in tiles of tile_width x tile_height px overlapping by `overlap` px."""
    from .model import HDMPixelSpace

    if not 0 <= overlap < min(tile_width, tile_height):
        raise ValueError(f"overlap {overlap} px must be >= 0 and smaller than the tile ({tile_width}x{tile_height} "
                         f"px)")
    px_per_cell = 1 if isinstance(getattr(model.model, "latent_format", None), HDMPixelSpace) else 8
    patch_px = px_per_cell * model.model.diffusion_model.config.patch_size
    for name, value, unit, what in (("tile_width", tile_width, patch_px, "one patch"),
                                    ("tile_height", tile_height, patch_px, "one patch"),
                                    ("overlap", overlap, px_per_cell, "one latent cell")):
        if value < 0 or value % unit:
            raise ValueError(f"{name} {value} px is not a multiple of {unit} px ({what} of this model)")
    tiling = Tiling(tile_height // px_per_cell, tile_width // px_per_cell, overlap // px_per_cell, batch=tile_batch)
    return _patched(model, "HDM Tiled Diffusion", TILES_OPTION, tiling)


def with_positions(model, positions: str) -> object:
    """The model with every area / tile given its place per `positions` ("canvas" or "own")."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return _patched(model, "HDM Area Positions", POSITIONS_OPTION, positions)
