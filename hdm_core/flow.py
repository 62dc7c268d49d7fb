"""The rectified-flow convention, in one place (SPEC §5).

t (= σ) runs from 1 (pure noise) to 0 (data): x_t = t·ε + (1 − t)·x0, and the model predicts v = ε − x0,
so x0 = x_t − t·v.
"""

from __future__ import annotations

import math

import torch


def _expand(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = t·ε + (1 − t)·x0."""
    t = _expand(t, x0)
    return t * noise + (1 - t) * x0


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target v = ε − x0."""
    return noise - x0


def denoised_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t − t·v."""
    return x - _expand(t, x) * v


def velocity_from_denoised(x: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t − x0) / t (t > 0)."""
    return (x - denoised) / _expand(t, x)


def sample_t_logit_normal(n: int, *, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Training times t = sigmoid(N(mean, std²)) (logit-normal, SPEC §5)."""
    gen_device = generator.device if generator is not None else device
    return torch.sigmoid(torch.randn(n, generator=generator, device=gen_device) * std + mean).to(device)


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift σ = s·t / (1 + (s − 1)·t), as ComfyUI's ModelSamplingDiscreteFlow (s = 1: identity)."""
    if not 0 < shift < math.inf:  # NaN fails too
        raise ValueError(f"schedule shift must be a finite number > 0, got {shift}")
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
