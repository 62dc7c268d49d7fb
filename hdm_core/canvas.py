"""The canvas: where each part of a picture sits.

HDM is trained on shifted square crops, each with the same crop of the whole image's position map (SPEC §4.4), so
the model reads a position map as *the place of what it draws in a larger picture*. This module is the one home of
that idea at inference:

* `Camera`: x/y shift and zoom, one validated value (SPEC §4.3);
* `canvas_position_map`: the map of any region of a canvas through a camera, exactly (bit for bit) the region's
  slice of the whole canvas's map: what an area prompt, a tile or a training crop must be given;
* `tile_regions`, `feather` and `blend`: MultiDiffusion, overlapping tiles whose outputs are averaged with weights
  that fade across the overlaps, so a canvas larger than the model was trained on renders in bounded memory.

Regions are in cells of the map (latent cells at inference, pixels in training); a map is [rows·cols, 2], row-major,
channel 0 = y, channel 1 = x, the long side of the *canvas* spanning [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .rope import aspect_info, axial_grid

MAX_SHIFT = 100.0                 # |x_shift|, |y_shift| in canvas units (the long side spans 2)
ZOOM_RANGE = (1e-3, 1e3)


def _finite(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN fails
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Camera:
    """Where the camera looks on the canvas (SPEC §4.3): positions become (p + shift) / zoom.

    x_shift > 0 moves the camera right (the content moves left), y_shift > 0 moves it down, zoom > 1 zooms in;
    shifts are in canvas units, where the long side spans 2. Camera() is the identity (the official default).
    """

    x_shift: float = 0.0
    y_shift: float = 0.0
    zoom: float = 1.0

    def __post_init__(self) -> None:
        for name in ("x_shift", "y_shift"):
            object.__setattr__(self, name, _finite(name, getattr(self, name), -MAX_SHIFT, MAX_SHIFT))
        object.__setattr__(self, "zoom", _finite("zoom", self.zoom, *ZOOM_RANGE))

    def as_dict(self) -> dict[str, float]:
        """{"x_shift": …, "y_shift": …, "zoom": …}: the keys of CAMERA_KEYS, as conditioning and metadata carry them."""
        return {name: getattr(self, name) for name in CAMERA_KEYS}

    @property
    def is_identity(self) -> bool:
        return self.x_shift == 0 and self.y_shift == 0 and self.zoom == 1

    def apply(self, pos: torch.Tensor) -> torch.Tensor:
        """(pos + shift) / zoom on a map [..., 2] (x_shift on channel 1, y_shift on channel 0); pos itself when
        the camera is the identity."""
        if self.is_identity:
            return pos
        shift = torch.tensor([self.y_shift, self.x_shift], dtype=pos.dtype, device=pos.device)
        return (pos + shift) / self.zoom

    def then(self, inner: Camera) -> Camera:
        """The camera that applies `inner` to positions already seen through this one: inner.apply(self.apply(p))."""
        try:
            return Camera(self.x_shift + inner.x_shift * self.zoom, self.y_shift + inner.y_shift * self.zoom,
                          self.zoom * inner.zoom)
        except ValueError as err:
            raise ValueError(f"the camera {self} followed by {inner} leaves the camera's range: {err}") from None


IDENTITY = Camera()  # the official default camera
CAMERA_KEYS = ("x_shift", "y_shift", "zoom")  # Camera's fields, in order


@dataclass(frozen=True)
class Region:
    """A window of a canvas: top / left corner and size, in cells of the map."""

    top: int
    left: int
    height: int
    width: int

    def check(self, rows: int, cols: int) -> Region:
        """This region, if it lies inside a rows × cols canvas and is not empty; else ValueError."""
        if self.height < 1 or self.width < 1 or self.top < 0 or self.left < 0 or \
                self.top + self.height > rows or self.left + self.width > cols:
            raise ValueError(f"region (top={self.top}, left={self.left}, {self.height}x{self.width}) does not fit "
                             f"the {rows}x{cols} canvas")
        return self

    def slice(self, t: torch.Tensor) -> torch.Tensor:
        """The region of a tensor whose last two dims are the canvas (rows, cols)."""
        return t[..., self.top:self.top + self.height, self.left:self.left + self.width]


def canvas_position_map(rows: int, cols: int, camera: Camera = IDENTITY, region: Region | None = None,
                        *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """The position map [h·w, 2] of `region` (default: all) of a rows × cols canvas seen through `camera`.

    Bit for bit the region's slice of the whole canvas's map, since every cell is computed from its own index on
    the canvas; with no region and the identity camera it is `make_axial_pos(rows, cols)` (SPEC §4.1). At latent
    resolution it is what the official callers pass the model (SPEC §4.3).
    """
    if min(rows, cols) < 1:
        raise ValueError(f"a canvas needs at least one cell per side, got {rows}x{cols}")
    region = (region or Region(0, 0, rows, cols)).check(rows, cols)
    # float64 on the CPU (MPS has none), then moved: the same values on every device
    grid = axial_grid(rows, cols, region.top, region.left, region.height, region.width)
    return camera.apply(grid.to(dtype)).to(device)


def keep_picture_camera(rows: int, cols: int, picture: Region, camera: Camera = IDENTITY) -> Camera:
    """The camera of a canvas grown around a picture (outpainting) under which the picture keeps the coordinates
    it had as a canvas of its own through `camera`: the map of `picture` on the grown canvas equals the picture's
    own map, to float rounding, and the new cells continue it outwards."""
    picture.check(rows, cols)
    grown, own = max(rows, cols), max(picture.height, picture.width)
    # Canvas coordinate of a cell: -n/L + (i + 1/2)·2/L. Solve (c_grown + s)/z = c_own for every cell index i.
    zoom = own / grown
    x_shift = (cols - 2 * picture.left - picture.width) / grown
    y_shift = (rows - 2 * picture.top - picture.height) / grown
    return Camera(x_shift, y_shift, zoom).then(camera)


# ---------------------------------------------------------------------------------------------------
# Tiled sampling (MultiDiffusion)
# ---------------------------------------------------------------------------------------------------

def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along an axis of n cells: the fewest tiles that overlap by at least `overlap` cells, spread
    evenly from flush with the start to flush with the end (so any n works)."""
    if tile >= n:
        return [0]
    count = math.ceil((n - tile) / (tile - overlap)) + 1
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def tile_regions(rows: int, cols: int, tile_rows: int, tile_cols: int, overlap: int) -> list[Region]:
    """Overlapping tiles that cover a rows × cols canvas, row by row; a tile larger than the canvas is clipped to
    it (one tile along that axis). Neighbours overlap by at least `overlap` cells (more where the tiles do not
    divide the canvas: they are spread evenly), so any canvas and tile size work."""
    for name, value in (("tile height", tile_rows), ("tile width", tile_cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < min(tile_rows, tile_cols):
        raise ValueError(f"tile overlap must be a whole number in [0, {min(tile_rows, tile_cols) - 1}] (less than "
                         f"the tile), got {overlap!r}")
    th, tw = min(tile_rows, rows), min(tile_cols, cols)
    return [Region(top, left, th, tw) for top in _starts(rows, tile_rows, overlap)
            for left in _starts(cols, tile_cols, overlap)]


def _ramp(n: int, fade_start: int, fade_end: int) -> torch.Tensor:
    """Weights along one axis of a tile: rising over the first `fade_start` cells, falling over the last
    `fade_end`, 1 between; never 0, so every cell of the canvas is covered."""
    w = torch.ones(n, dtype=torch.float64)
    if fade_start:
        w[:fade_start] = torch.minimum(w[:fade_start], (torch.arange(fade_start) + 0.5) / fade_start)
    if fade_end:
        w[n - fade_end:] = torch.minimum(w[n - fade_end:], (torch.arange(fade_end, 0, -1) - 0.5) / fade_end)
    return w


def feather(region: Region, rows: int, cols: int, overlap: int) -> torch.Tensor:
    """Blend weights [h, w] of a tile: they fade linearly over `overlap` cells on every side that faces another
    tile, and stay 1 on the sides at the canvas border (so a single tile has weight 1 everywhere)."""
    fade = min(overlap, region.height // 2, region.width // 2)
    ys = _ramp(region.height, fade if region.top > 0 else 0, fade if region.top + region.height < rows else 0)
    xs = _ramp(region.width, fade if region.left > 0 else 0, fade if region.left + region.width < cols else 0)
    return (ys[:, None] * xs[None, :]).float()


def blend(x: torch.Tensor, regions: list[Region], weights: list[torch.Tensor],
          fn: Callable[[list[Region]], torch.Tensor], batch: int = 1) -> torch.Tensor:
    """Σ_r weight_r · out_r / Σ_r weight_r over the canvas of x [B, C, H, W], where fn(group) returns the outputs
    [len(group)·B, C', h, w] of up to `batch` regions of one size at once (region after region along the batch).
    A single region covering the canvas returns fn's output unchanged."""
    rows, cols = x.shape[-2:]
    if len(regions) == 1 and (regions[0].height, regions[0].width) == (rows, cols):
        return fn(regions)
    total = torch.zeros(x.shape[0], 1, rows, cols, dtype=torch.float32, device=x.device)
    out = None
    for group in _groups(regions, batch):
        outputs = fn([regions[i] for i in group]).chunk(len(group))
        for i, y in zip(group, outputs):
            if out is None:
                out = torch.zeros(*y.shape[:2], rows, cols, dtype=torch.float32, device=y.device)
            w = weights[i].to(y.device)
            regions[i].slice(out).add_(y.float() * w)
            regions[i].slice(total).add_(w)
    return (out / total).to(x.dtype)


def _groups(regions: list[Region], batch: int) -> list[list[int]]:
    """Indices of consecutive regions of one size, at most `batch` per group."""
    groups: list[list[int]] = []
    for i, r in enumerate(regions):
        last = groups[-1] if groups else None
        if last and len(last) < batch and (regions[last[0]].height, regions[last[0]].width) == (r.height, r.width):
            last.append(i)
        else:
            groups.append([i])
    return groups


# ---------------------------------------------------------------------------------------------------
# What the model is given for a region: its true place, or a picture of its own
# ---------------------------------------------------------------------------------------------------

def slice_map(pos_map: torch.Tensor, rows: int, cols: int, region: Region) -> torch.Tensor:
    """The region's part of a canvas map [rows·cols, 2] or [B, rows·cols, 2] (same leading shape)."""
    grid = pos_map.reshape(*pos_map.shape[:-2], rows, cols, 2)
    window = grid[..., region.top:region.top + region.height, region.left:region.left + region.width, :]
    return window.reshape(*pos_map.shape[:-2], region.height * region.width, 2)


def region_inputs(pos_map: torch.Tensor, aspect: torch.Tensor, rows: int, cols: int, region: Region,
                  own_cameras: Sequence[Camera] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(position map, aspect) for the model call on a region of a rows × cols canvas whose map and aspect are
    `pos_map` [rows·cols, 2] or [B or 1, rows·cols, 2] and `aspect` [B]: the region's slice of the map (same
    leading shape) and the canvas's aspect (its true place in the picture, what training shows the model); or,
    with `own_cameras` (one, or one per sample), the region as a picture of its own: its own whole map through
    each camera [len(own_cameras), h·w, 2] and its own aspect."""
    if own_cameras is None:
        return slice_map(pos_map, rows, cols, region), aspect
    maps = [canvas_position_map(region.height, region.width, cam, device=pos_map.device) for cam in own_cameras]
    own_aspect = torch.full_like(aspect, aspect_info(region.height, region.width))
    return torch.stack(maps).to(pos_map.dtype), own_aspect


@dataclass(frozen=True)
class Tiling:
    """Tiled sampling: tiles of height × width cells overlapping by `overlap` cells; `own_positions` gives every tile
    a whole picture's map (what tiled upscalers do for other models) instead of its slice of the canvas's."""

    height: int
    width: int
    overlap: int
    own_positions: bool = False
    batch: int = 1               # tiles per model call: more is faster, 1 keeps memory at one tile's

    def __post_init__(self) -> None:
        tile_regions(self.height, self.width, self.height, self.width, self.overlap)  # checks the numbers
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"tile batch must be a whole number >= 1, got {self.batch!r}")


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, pos_map, aspect) -> output


def per_tile(value: torch.Tensor, samples: int, tiles: int) -> torch.Tensor:
    """A per-sample input [B or 1, ...] (or a 0-d one) for `tiles` tiles stacked along the batch: [tiles·B, ...],
    tile after tile, each with the B samples' values (the layout `tiled_forward` stacks x in)."""
    value = value.reshape(1) if value.dim() == 0 else value
    return value.expand(samples, *value.shape[1:]).repeat(tiles, *[1] * (value.dim() - 1))


def tiled_forward(forward: Forward, x: torch.Tensor, pos_map: torch.Tensor, aspect: torch.Tensor, tiling: Tiling,
                  cameras: Sequence[Camera] = (IDENTITY,)) -> torch.Tensor:
    """forward(x_tiles, maps, aspects) on the tiles of x [B, C, H, W] (whose map is pos_map [H·W, 2] or
    [B or 1, H·W, 2] and aspect [B]), `tiling.batch` tiles per call stacked along the batch (tile after tile, each
    B samples: give the forward's other per-sample inputs the same layout with `per_tile`), blended with `feather`
    weights; `cameras` (one, or one per sample) are only used for `tiling.own_positions`. One tile covering the
    canvas is exactly forward(x, pos_map, aspect)."""
    b, rows, cols = x.shape[0], *x.shape[-2:]
    regions = tile_regions(rows, cols, tiling.height, tiling.width, tiling.overlap)
    weights = [feather(r, rows, cols, tiling.overlap) for r in regions]
    own = cameras if tiling.own_positions else None

    def run(group: list[Region]) -> torch.Tensor:
        inputs = [region_inputs(pos_map, aspect, rows, cols, r, own) for r in group]
        maps = torch.cat([m.expand(b, -1, -1) if len(group) > 1 else m for m, _ in inputs])
        return forward(torch.cat([r.slice(x) for r in group]), maps, torch.cat([a for _, a in inputs]))
    return blend(x, regions, weights, run, tiling.batch)
