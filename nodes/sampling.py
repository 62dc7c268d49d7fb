"""What HDM Sampler does: the official uniform flow schedule and HDM's samplers, run through ComfyUI's sampling
machinery (progress bar, live previews, interruption, memory management). The node shell is in sampling_nodes.py.

Like every node-logic file, this one imports without ComfyUI: ComfyUI modules and the glue that needs them are
imported inside the functions that run in ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..hdm_core.pipeline import seeded_noise
from ..hdm_core.sampling import SAMPLERS, flow_sigmas


def as_ksampler(fn: Callable[..., torch.Tensor]) -> Any:
    """An hdm_core sampler as a ComfyUI KSAMPLER object."""
    import comfy.samplers

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback)
    return comfy.samplers.KSAMPLER(sample)


def batch_noise(latent: dict, samples: torch.Tensor, seed: int) -> torch.Tensor:
    """Noise where sample i uses seed + batch_index[i] (hdm_core's convention), so a frame does not depend on
    its batch; a latent whose batch_index repeats (camera sweep) gets the same noise for every frame."""
    indices = latent.get("batch_index") or list(range(samples.shape[0]))
    shape = (1, *samples.shape[1:])
    return torch.cat([seeded_noise(shape, (seed + int(i)) % 2**64) for i in indices]).to(samples.dtype)


def hdm_sample(model, positive, negative, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
               shift: float, denoise: float) -> dict:
    """HDM Sampler: official (optionally shifted) uniform schedule and an hdm_core sampler, run by ComfyUI."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    from .model import HDMModel

    if not isinstance(model.model, HDMModel):
        raise ValueError(f"HDM Sampler needs an HDM MODEL (from HDM Checkpoint Loader / HDM Split Loader), got "
                         f"{type(model.model).__name__}; use KSampler for other models")
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    out = dict(latent)
    if denoise <= 0.0:  # nothing to denoise
        out["samples"] = samples
        return out
    sigmas = flow_sigmas(steps, shift, denoise)  # img2img: the last `steps` steps of a steps/denoise schedule
    noise = batch_noise(latent, samples, seed)
    torch.manual_seed(seed)  # TREAD routing draws from the global RNG, as with KSampler
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    out["samples"] = comfy.sample.sample_custom(
        model, noise, cfg, as_ksampler(SAMPLERS[sampler_name]), sigmas, positive, negative, samples,
        noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed)
    return out
