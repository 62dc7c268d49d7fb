"""Measurements of a generated shape image: foreground mask, dominant colour, shape, centroid and area.

Images may be PIL images, uint8 arrays [H, W, 3] or float tensors/arrays [3, H, W] / [H, W, 3] in [0, 1].
Coordinates follow the position-map convention: the long side of the frame spans [-1, 1], x to the right,
y downwards, (0, 0) at the frame centre.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from training.toy_data import COLOURS, SHAPES

MIN_SATURATION = 0.25   # max(rgb) - min(rgb); the background is near grey (≈ 0.02), every palette colour > 0.5
RGB = tuple[int, int, int]
MIN_AREA = 0.01         # fewer foreground pixels than this fraction of the frame: "no shape"


def as_array(image) -> np.ndarray:
    """Float array [H, W, 3] in [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):  # torch
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected one image [3, H, W] or [H, W, 3], got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    arr = arr.astype(np.float32)
    if arr.max() > 1.5:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def saturation(image) -> np.ndarray:
    arr = as_array(image)
    return arr.max(-1) - arr.min(-1)


def foreground(image) -> np.ndarray:
    """Boolean mask [H, W] of saturated (shape) pixels."""
    return saturation(image) > MIN_SATURATION


def label_blobs(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """8-connected components of a boolean mask: labels [H, W] (0 = background, k = component k) and the size of
    each component (sizes[k - 1])."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    sizes: list[int] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        labels[y0, x0] = len(sizes) + 1
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = len(sizes) + 1
                        stack.append((ny, nx))
        sizes.append(size)
    return labels, sizes


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (the shape; stray specks and the partial copies an
    undertrained model can draw where the camera looks past the trained positions are left out)."""
    labels, sizes = label_blobs(mask)
    return labels == int(np.argmax(sizes)) + 1 if sizes else np.zeros_like(mask)


def frame_coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y [H, 1], x [1, W]) with the long side spanning [-1, 1]."""
    long_side = max(h, w)
    y = (np.arange(h) + 0.5 - h / 2) * (2 / long_side)
    x = (np.arange(w) + 0.5 - w / 2) * (2 / long_side)
    return y[:, None], x[None, :]


@dataclass
class ShapeStats:
    colour: str | None       # dominant palette colour of the foreground (None: no shape found)
    shape: str | None        # circle / square / triangle from the fill ratio of the bounding box
    area: float              # the largest blob's fraction of the frame
    cx: float                # centroid x (frame units, long side = [-1, 1]); nan without a shape
    cy: float                # centroid y
    taper: float             # top-third / bottom-third pixels of the blob (triangle ≈ 0.25, others ≈ 1)
    corners: float           # fullness of the bounding box's corner cells (square ≈ 1, circle ≈ 0.3)


def dominant_colour(image, mask: np.ndarray | None = None, palette: Mapping[str, RGB] = COLOURS) -> str | None:
    """The `palette` colour (default: the demo's) most foreground pixels (or those of `mask`) are closest to;
    None without foreground."""
    arr = as_array(image)
    mask = foreground(arr) if mask is None else mask
    if mask.mean() < MIN_AREA:
        return None
    names = list(palette)
    rgb = np.array([palette[n] for n in names], dtype=np.float32) / 255.0
    pixels = arr[mask]
    nearest = ((pixels[:, None, :] - rgb[None]) ** 2).sum(-1).argmin(1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def shape_of(mask: np.ndarray) -> tuple[str | None, float, float]:
    """(shape, taper, corners) of a blob, from two features of its bounding box that survive blur:
    taper = filled pixels in the top third / in the bottom third (a triangle ≈ 0.25, circle and square ≈ 1) and
    corners = how full the four corner cells (a quarter of each side) are (square ≈ 1, circle ≈ 0.3 on the
    training renders; a blurry sample lowers both, so the cut is at 0.4)."""
    if mask.mean() < MIN_AREA:
        return None, float("nan"), float("nan")
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float64)
    h, w = box.shape
    third, ch, cw = max(1, round(h / 3)), max(1, round(h / 4)), max(1, round(w / 4))
    taper = float(box[:third].sum() / max(box[-third:].sum(), 1.0))
    corners = float(np.mean([box[:ch, :cw].mean(), box[:ch, -cw:].mean(), box[-ch:, :cw].mean(),
                             box[-ch:, -cw:].mean()]))
    if taper < 0.5:
        return "triangle", taper, corners
    return ("square" if corners > 0.4 else "circle"), taper, corners


def shape_mask(image) -> np.ndarray:
    """The shape: the largest blob of pixels at least half as saturated as the shape's typical pixel (this drops
    the faint fringe a small model paints around edges, and stray specks)."""
    sat = saturation(image)
    coarse = sat > MIN_SATURATION
    if coarse.mean() < MIN_AREA:
        return np.zeros_like(coarse)
    peak = float(np.percentile(sat[coarse], 90))
    return largest_blob(sat > max(MIN_SATURATION, 0.5 * peak))


def measure(image, palette: Mapping[str, RGB] = COLOURS) -> ShapeStats:
    """Colour (the nearest of `palette`; training.toy_data.ALL_COLOURS also tells the fine-tuning demo's new
    colours), shape, area and centroid of the shape (see `shape_mask`)."""
    arr = as_array(image)
    blob = shape_mask(arr)
    area = float(blob.mean())
    if area < MIN_AREA:
        return ShapeStats(None, None, area, float("nan"), float("nan"), float("nan"), float("nan"))
    y, x = frame_coords(*blob.shape)
    weight = blob.astype(np.float64)
    cx = float((weight * x).sum() / weight.sum())
    cy = float((weight * y).sum() / weight.sum())
    shape, taper, corners = shape_of(blob)
    return ShapeStats(dominant_colour(arr, blob, palette), shape, area, cx, cy, taper, corners)


def chance_level(palette: Mapping[str, RGB] = COLOURS) -> dict[str, float]:
    """Accuracy of guessing uniformly at random (among the colours of `palette`)."""
    return {"colour": 1 / len(palette), "shape": 1 / len(SHAPES), "both": 1 / (len(palette) * len(SHAPES))}


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely guessing alone reaches k hits."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
