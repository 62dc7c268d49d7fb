"""Position maps (SPEC §4) and axial RoPE (SPEC §3.8).

A position map is a float tensor [..., rows·cols, 2] in row-major order with channel 0 = y (rows) and
channel 1 = x (columns). The longer side spans [-1, 1], the shorter one ±short/long, at cell centres.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def axis_coords(n: int, long_side: int, start: int = 0, length: int | None = None, *,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Cell centres (float64) of cells [start, start + length) on an axis of n cells of a canvas whose long side
    has `long_side` cells: the long side spans [-1, 1], this one ±n/long_side (SPEC §4.1). Each value depends only
    on its own index, so a part of an axis is exactly that part of the whole axis."""
    length = n - start if length is None else length
    r = n / long_side
    return -r + (torch.arange(start, start + length, dtype=torch.float64, device=device) + 0.5) * (2 * r / n)


def axial_grid(rows: int, cols: int, top: int = 0, left: int = 0, height: int | None = None,
               width: int | None = None, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The cell centres [h·w, 2] (float64; channel 0 = y, 1 = x) of the window (top, left, height, width), default
    all, of a rows × cols grid: bit for bit that part of the whole grid."""
    long_side = max(rows, cols)
    ys = axis_coords(rows, long_side, top, height, device=device)
    xs = axis_coords(cols, long_side, left, width, device=device)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def make_axial_pos(rows: int, cols: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Default axial grid for a rows × cols grid → [rows·cols, 2] (SPEC §4.1); `hdm_core.canvas` has the map of a
    region of a canvas through a camera."""
    if rows < 1 or cols < 1:
        raise ValueError(f"position grid must be at least 1x1, got {rows}x{cols}")
    return axial_grid(rows, cols, device=device).to(dtype)  # float64 then cast: the reference to 1 ulp


def downsample_pos(pos: torch.Tensor, height: int, width: int, factor: int = 2) -> torch.Tensor:
    """Antialiased bilinear reduction of a map [B, H·W, 2] to [B, (H/f)·(W/f), 2] (SPEC §4.2).

    This is what the model does with an external latent-resolution map to reach patch resolution.
    """
    if pos.dim() == 2:
        pos = pos[None]
    b = pos.shape[0]
    if pos.shape[1] != height * width:
        raise ValueError(f"position map has {pos.shape[1]} rows but the latent is {height}x{width} "
                         f"= {height * width}; pass a latent-resolution map")
    grid = pos.reshape(b, height, width, 2).permute(0, 3, 1, 2).float()
    small = F.interpolate(grid, size=(height // factor, width // factor), mode="bilinear",
                          align_corners=False, antialias=True)
    return small.permute(0, 2, 3, 1).reshape(b, -1, 2).to(pos.dtype)


def area_downsample_pos(pos: torch.Tensor, rows: int, cols: int, factor: int) -> torch.Tensor:
    """Average-pool a map [rows·cols, 2] by `factor` (pixel → latent resolution, SPEC §4.4: the reference the
    training crop's latent-resolution map is tested against)."""
    grid = pos.reshape(1, rows, cols, 2).permute(0, 3, 1, 2)
    small = F.avg_pool2d(grid, factor)
    return small.permute(0, 2, 3, 1).reshape(-1, 2)


def aspect_info(height: int, width: int) -> float:
    """Aspect-ratio conditioning as every official inference path computes it: ln(width / height)."""
    return math.log(width / height)


# ---------------------------------------------------------------------------------------------------
# Axial RoPE with learned per-head log-frequencies
# ---------------------------------------------------------------------------------------------------

def rope_angles(pos: torch.Tensor, log_freqs: torch.Tensor) -> torch.Tensor:
    """Angles [B, heads, S, 2F] for positions [B, S, 2] and log-frequencies [heads, F, 2].

    Pair q = 2f + a rotates with frequency f on axis a (a = 0 → y, 1 → x): θ = pos_a · exp(Φ[h, f, a]).
    """
    dtype = torch.promote_types(log_freqs.dtype, torch.float32)         # at least float32, float64 kept
    freqs = log_freqs.to(pos.device, dtype).exp()                       # (H, F, 2)
    theta = pos.to(dtype)[:, None, :, None, :] * freqs[None, :, None]    # (B, H, S, F, 2)
    return theta.flatten(-2)                                             # (B, H, S, 2F)


def apply_rope(z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2q, 2q+1) of z [B, H, S, d]; dims past 4F pass through unchanged."""
    n = 2 * cos.shape[-1]
    pairs = z[..., :n].unflatten(-1, (-1, 2))                             # (B, H, S, 2F, 2)
    z0, z1 = pairs.unbind(-1)
    rotated = torch.stack((z0 * cos - z1 * sin, z1 * cos + z0 * sin), dim=-1).flatten(-2)
    return rotated if n == z.shape[-1] else torch.cat((rotated, z[..., n:]), dim=-1)
