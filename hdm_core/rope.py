"""Position maps (SPEC §4) and axial RoPE (SPEC §3.8).

A position map is a float tensor [..., rows·cols, 2] in row-major order with channel 0 = y (rows) and
channel 1 = x (columns). The longer side spans [-1, 1], the shorter one ±short/long, at cell centres.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_axial_pos(rows: int, cols: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Default axial grid for a rows × cols grid → [rows·cols, 2] (SPEC §4.1)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"position grid must be at least 1x1, got {rows}x{cols}")
    long_side = max(rows, cols)
    r_y, r_x = rows / long_side, cols / long_side
    # Cell centres: -r + (i + 1/2) * (2r / n), computed in float64 then cast, to match the reference to 1 ulp.
    y = -r_y + (torch.arange(rows, dtype=torch.float64, device=device) + 0.5) * (2 * r_y / rows)
    x = -r_x + (torch.arange(cols, dtype=torch.float64, device=device) + 0.5) * (2 * r_x / cols)
    grid = torch.stack(torch.meshgrid(y, x, indexing="ij"), dim=-1)  # (rows, cols, 2)
    return grid.reshape(rows * cols, 2).to(dtype)


def camera_pos(pos: torch.Tensor, x_shift: float | torch.Tensor = 0.0, y_shift: float | torch.Tensor = 0.0,
               zoom: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Move the camera: (pos + shift) / zoom, x_shift on channel 1, y_shift on channel 0 (SPEC §4.3).

    Tensor arguments of shape [B] give one camera per sample (pos then broadcasts to [B, N, 2]).
    """
    if not isinstance(zoom, torch.Tensor) and zoom <= 0:
        raise ValueError(f"zoom must be > 0, got {zoom}")
    if isinstance(x_shift, torch.Tensor) or isinstance(y_shift, torch.Tensor) or isinstance(zoom, torch.Tensor):
        as_col = [torch.as_tensor(v, dtype=pos.dtype, device=pos.device).reshape(-1, 1) for v in
                  (y_shift, x_shift, zoom)]
        shift = torch.stack(torch.broadcast_tensors(as_col[0], as_col[1]), dim=-1)  # (B, 1, 2)
        return (pos + shift) / as_col[2][..., None]
    if x_shift == 0 and y_shift == 0 and zoom == 1:
        return pos
    shift = torch.tensor([y_shift, x_shift], dtype=pos.dtype, device=pos.device)
    return (pos + shift) / zoom


def camera_position_map(latent_height: int, latent_width: int, x_shift: float = 0.0, y_shift: float = 0.0,
                        zoom: float = 1.0) -> torch.Tensor:
    """The latent-resolution camera map [H·W, 2] that the official callers pass to the model."""
    return camera_pos(make_axial_pos(latent_height, latent_width), x_shift, y_shift, zoom)


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


def crop_pos(pos: torch.Tensor, rows: int, cols: int, top: int, left: int, height: int,
             width: int) -> torch.Tensor:
    """Crop a map [rows·cols, 2] of a rows × cols grid to the window (top, left, height, width)."""
    if top < 0 or left < 0 or top + height > rows or left + width > cols:
        raise ValueError(f"crop window (top={top}, left={left}, {height}x{width}) does not fit the "
                         f"{rows}x{cols} grid")
    window = pos.reshape(rows, cols, 2)[top:top + height, left:left + width]
    return window.reshape(height * width, 2)


def area_downsample_pos(pos: torch.Tensor, rows: int, cols: int, factor: int) -> torch.Tensor:
    """Average-pool a map [rows·cols, 2] by `factor` (pixel → latent resolution in training, SPEC §4.4)."""
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
