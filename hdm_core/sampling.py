"""Flow samplers with the k-diffusion contract (as ComfyUI vendors it).

`model(x, sigma) -> denoised` with sigma a tensor [B]; `sigmas` a decreasing schedule ending at 0; the callback
gets {"x", "i", "sigma", "sigma_hat", "denoised"} after each step and may raise to cancel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .flow import shift_sigmas

Denoiser = Callable[..., torch.Tensor]
MAX_STEPS = 10_000  # sampling steps; the official default is 32
MAX_SCHEDULE = 100_000  # schedule length steps / denoise (img2img keeps its last `steps` entries)
Callback = Callable[[dict[str, Any]], None]


class SamplingCancelled(Exception):
    """Raised (by a callback or a cancel check) to stop sampling between steps."""


def flow_sigmas(steps: int, shift: float = 1.0, denoise: float = 1.0) -> torch.Tensor:
    """The official uniform schedule 1, 1 − 1/n, … (float32 repeated subtraction, as the official loop), then 0.

    denoise < 1 (img2img) keeps the last `steps` steps of a ⌊steps/denoise⌋-step schedule, as ComfyUI does,
    so sampling starts near σ = denoise and still takes `steps` steps.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number in [1, {MAX_STEPS}], got {steps!r}")
    if not 0.0 < denoise <= 1.0:  # NaN fails too
        raise ValueError(f"denoise (img2img strength) must be in (0, 1], got {denoise}")
    total = int(steps / denoise)
    if total > MAX_SCHEDULE:
        raise ValueError(f"{steps} steps at denoise {denoise} need a {total}-step schedule (limit {MAX_SCHEDULE}); "
                         f"raise denoise to at least {steps / MAX_SCHEDULE:.2g} or use fewer steps")
    # np.subtract.accumulate subtracts in order in float32: the same rounding as the official loop, vectorised.
    steps_down = np.concatenate(([1.0], np.full(total - 1, 1.0 / total))).astype(np.float32)
    ts = torch.from_numpy(np.subtract.accumulate(steps_down))
    return torch.cat((shift_sigmas(ts, shift), torch.zeros(1)))[-(steps + 1):]


def _report(callback: Callback | None, x: torch.Tensor, i: int, sigma: torch.Tensor,
            denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _sigma(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x.device).expand(x.shape[0])


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None) -> torch.Tensor:
    """Euler on dx/dσ = (x − denoised)/σ; with `flow_sigmas` this is the official HDM sampler."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma = _sigma(sigmas[i], x)
        denoised = model(x, sigma, **extra_args)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        _report(callback, x, i, sigma, denoised)
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn); Euler on the last step."""
    extra_args = extra_args or {}
    last = len(sigmas) - 1 if sigmas[-1].item() == 0 else None  # read once: no host sync inside the loop
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _sigma(sigma, x), **extra_args)
        d = (x - denoised) / sigma
        x_euler = x + d * (sigma_next - sigma)
        if i + 1 == last:
            x = x_euler
        else:
            d_next = (x_euler - model(x_euler, _sigma(sigma_next, x), **extra_args)) / sigma_next
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        _report(callback, x, i, _sigma(sigma, x), denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) for flow: α = 1 − σ, λ = ln(α/σ), data prediction, multistep."""
    extra_args = extra_args or {}
    values = sigmas.tolist()  # read once: no host sync inside the loop
    lam = [math.log((1 - s) / s) if 0 < s < 1 else (math.inf if s == 0 else -math.inf) for s in values]
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = values[i], values[i + 1]
        denoised = model(x, _sigma(sigmas[i], x), **extra_args)
        if s_next == 0:
            x = denoised
        else:
            # x' = (σ'/σ)·x − α'·(e^{−h} − 1)·D, with e^{−h} = α σ' / (σ α') (finite even at σ = 1)
            alpha, alpha_next = 1 - s, 1 - s_next
            x = (s_next / s) * x - (alpha * s_next / s - alpha_next) * _multistep(
                denoised, old_denoised, lam[i + 1] - lam[i], h_last)
        old_denoised, h_last = denoised, lam[i + 1] - lam[i]
        _report(callback, x, i, _sigma(sigmas[i], x), denoised)
    return x


def _multistep(denoised: torch.Tensor, old: torch.Tensor | None, h: float, h_last: float | None) -> torch.Tensor:
    """Second-order combination of the last two data predictions (first order when undefined)."""
    if old is None or h_last is None or not math.isfinite(h_last) or not math.isfinite(h):
        return denoised
    r = h_last / h
    return (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v = v_u + s·(v_c − v_u) (equivalent on x0, since x0 is affine in v)."""
    return v_uncond + scale * (v_cond - v_uncond)
