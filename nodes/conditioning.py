"""What the text, camera, TREAD-gamma and sweep nodes do, as plain functions (no ComfyUI: unit-tested as they are).

They only copy conditioning and set keys; the keys become model inputs in model.HDMModel.extra_conds
(x_shift / y_shift / zoom → camera map, tread_gamma → routing rate). The node shells are in conditioning_nodes.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..hdm_core.canvas import Camera

# Widget limits (what the sliders offer; the API is held to hdm_core.canvas.Camera's own, wider, limits).
SHIFT = {"min": -5.0, "max": 5.0, "step": 0.01}
ZOOM = {"min": 0.2, "max": 5.0, "step": 0.01}
GAMMA = {"min": 0.0, "max": 1.0, "step": 0.01}
EASINGS = ("linear", "ease_in_out")


def set_values(conditioning: list, values: dict) -> list:
    """A copy of `conditioning` with `values` set in every entry's dict; the input is left untouched."""
    return [[tensor, {**options, **values}] for tensor, options in conditioning]


def with_camera(positive: list, negative: list, camera: Camera) -> tuple[list, list]:
    """HDM Camera: both conditionings with the camera set."""
    values = camera.as_dict()
    return set_values(positive, values), set_values(negative, values)


def with_tread_gamma(positive: list, negative: list, positive_gamma: float, negative_gamma: float) -> tuple[list, list]:
    """HDM Tread Gamma: each gamma on its own conditioning (HDM-ext wrote the negative one into the positive)."""
    for name, gamma in (("positive_gamma", positive_gamma), ("negative_gamma", negative_gamma)):
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (1 would drop every image token), got {gamma}")
    return (set_values(positive, {"tread_gamma": float(positive_gamma)}),
            set_values(negative, {"tread_gamma": float(negative_gamma)}))


def encode_official(clip: Any, text: str) -> list:
    """HDM Text Encode: the prompt tokenized as the official pipeline does (raw text, no weights), then encoded."""
    if clip is None:
        raise RuntimeError("ERROR: clip input is invalid: None (the loader found no text encoder)")
    tokenizer = getattr(clip, "tokenizer", None)
    if not hasattr(tokenizer, "tokenize_official"):
        raise ValueError("HDM Text Encode needs the CLIP output of HDM Checkpoint Loader or HDM Split Loader; "
                         "use CLIPTextEncode for other text encoders")
    return clip.encode_from_tokens_scheduled(tokenizer.tokenize_official(text))


# ---------------------------------------------------------------------------------------------------
# Camera sweep
# ---------------------------------------------------------------------------------------------------

def camera_path(frames: int, start: Camera, end: Camera, easing: str = "linear") -> dict[str, torch.Tensor]:
    """Per-frame x_shift, y_shift (linear) and zoom (geometric, i.e. constant zoom speed) as [frames] tensors."""
    if easing not in EASINGS:
        raise ValueError(f"easing must be one of {', '.join(EASINGS)}, got {easing!r}")
    t = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    if easing == "ease_in_out":
        t = (1 - torch.cos(math.pi * t)) / 2
    zoom = torch.exp(math.log(start.zoom) + t * (math.log(end.zoom) - math.log(start.zoom)))
    return {"x_shift": (start.x_shift + t * (end.x_shift - start.x_shift)).float(),
            "y_shift": (start.y_shift + t * (end.y_shift - start.y_shift)).float(), "zoom": zoom.float()}


def repeat_first(latent: dict, frames: int) -> dict:
    """The latent's first sample repeated `frames` times, every copy with its batch_index (so the same noise)."""
    samples = latent["samples"][:1]
    first = (latent.get("batch_index") or [0])[0]
    out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
    out.update(samples=samples.repeat(frames, *([1] * (samples.dim() - 1))), batch_index=[first] * frames)
    if "noise_mask" in latent:
        out["noise_mask"] = latent["noise_mask"][:1]
    return out


def sweep(positive: list, negative: list, latent: dict, frames: int, start: Camera, end: Camera,
          easing: str = "linear") -> tuple[list, list, dict]:
    """HDM Camera Sweep: one camera per frame on both conditionings, and the latent repeated once per frame."""
    if frames < 2:
        raise ValueError(f"need frames >= 2, got {frames}")
    path = camera_path(frames, start, end, easing)
    return set_values(positive, path), set_values(negative, path), repeat_first(latent, frames)
