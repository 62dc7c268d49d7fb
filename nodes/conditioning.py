"""Text encoding, camera and TREAD-gamma nodes. They only copy conditioning and set keys; the keys become model
inputs in model.HDMModel.extra_conds (x_shift / y_shift / zoom → camera map, tread_gamma → routing rate)."""

from __future__ import annotations

import math

import torch

CAMERA_KEYS = ("x_shift", "y_shift", "zoom")
CAMERA_DEFAULTS = {"x_shift": 0.0, "y_shift": 0.0, "zoom": 1.0}  # the identity camera
SHIFT = {"min": -5.0, "max": 5.0, "step": 0.01, "display": "slider"}
ZOOM = {"min": 0.2, "max": 5.0, "step": 0.01, "display": "slider"}
GAMMA = {"min": 0.0, "max": 1.0, "step": 0.01, "display": "slider"}
CONDS = {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",)}


def check_camera(x_shift: float, y_shift: float, zoom: float) -> None:
    """Finite shifts and a finite zoom > 0 (widgets can be set to NaN through the API), else ValueError."""
    for name, value in (("x_shift", x_shift), ("y_shift", y_shift), ("zoom", zoom)):
        if not math.isfinite(value) or (name == "zoom" and value <= 0):
            raise ValueError(f"{name} must be a finite number{' > 0' if name == 'zoom' else ''}, got {value}")


def set_values(conditioning: list, values: dict) -> list:
    """A copy of `conditioning` with `values` set in every entry's dict; the input is left untouched."""
    return [[tensor, {**options, **values}] for tensor, options in conditioning]


class HDMTextEncode:
    DESCRIPTION = ("Encode a prompt exactly as the official HDM pipeline does: the raw text through Qwen3-0.6B, "
                   "no (weight:1.2) syntax, no padding or truncation; an empty prompt becomes one pad token.")
    CATEGORY = "HDM/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The Qwen3 hidden states of the prompt.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP output of an HDM loader."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The prompt."}),
        }}

    def encode(self, clip, text):
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None (the loader found no text encoder)")
        tokenizer = getattr(clip, "tokenizer", None)
        if not hasattr(tokenizer, "tokenize_official"):
            raise ValueError("HDM Text Encode needs the CLIP output of HDM Checkpoint Loader or HDM Split Loader; "
                             "use CLIPTextEncode for other text encoders")
        return (clip.encode_from_tokens_scheduled(tokenizer.tokenize_official(text)),)


class HDMCameraParam:
    DESCRIPTION = ("Camera control: shift the view (x right, y down, in units where the long side spans 2) and "
                   "zoom (>1 zooms in). The official pipeline always applies a camera; defaults 0 / 0 / 1 are "
                   "the identity camera.")
    CATEGORY = "HDM/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("positive with the camera", "negative with the camera")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **CONDS,
            "x_shift": ("FLOAT", {"default": 0.0, **SHIFT, "tooltip": "Horizontal camera shift (+ = right)."}),
            "y_shift": ("FLOAT", {"default": 0.0, **SHIFT, "tooltip": "Vertical camera shift (+ = down)."}),
            "zoom": ("FLOAT", {"default": 1.0, **ZOOM, "tooltip": "Zoom factor (> 1 zooms in)."}),
        }}

    def apply(self, positive, negative, x_shift, y_shift, zoom):
        check_camera(x_shift, y_shift, zoom)
        values = {"x_shift": float(x_shift), "y_shift": float(y_shift), "zoom": float(zoom)}
        return set_values(positive, values), set_values(negative, values)


class HDMTreadGamma:
    DESCRIPTION = ("TREAD guidance: route this fraction of the image tokens around the backbone in each branch "
                   "(0 = off). A weaker uncond branch (negative_gamma > positive_gamma) sharpens guidance.")
    CATEGORY = "HDM/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("positive with its gamma", "negative with its gamma")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **CONDS,
            "positive_gamma": ("FLOAT", {"default": 0.0, **GAMMA, "tooltip": "Routing rate of the cond pass."}),
            "negative_gamma": ("FLOAT", {"default": 0.15, **GAMMA, "tooltip": "Routing rate of the uncond pass."}),
        }}

    def apply(self, positive, negative, positive_gamma, negative_gamma):
        for name, gamma in (("positive_gamma", positive_gamma), ("negative_gamma", negative_gamma)):
            if not 0.0 <= gamma < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (1 would drop every image token), got {gamma}")
        # Each gamma goes to its own conditioning (HDM-ext wrote the negative gamma into the positive one).
        return (set_values(positive, {"tread_gamma": float(positive_gamma)}),
                set_values(negative, {"tread_gamma": float(negative_gamma)}))


def camera_path(frames: int, start: tuple[float, float, float], end: tuple[float, float, float],
                easing: str = "linear") -> dict[str, torch.Tensor]:
    """Per-frame x_shift, y_shift (linear) and zoom (geometric, i.e. constant zoom speed) as [frames] tensors."""
    t = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    if easing == "ease_in_out":
        t = (1 - torch.cos(math.pi * t)) / 2
    (x0, y0, z0), (x1, y1, z1) = start, end
    zoom = torch.exp(math.log(z0) + t * (math.log(z1) - math.log(z0)))
    return {"x_shift": (x0 + t * (x1 - x0)).float(), "y_shift": (y0 + t * (y1 - y0)).float(), "zoom": zoom.float()}


class HDMCameraSweep:
    DESCRIPTION = ("Render a camera move as a batch of frames: x/y shift and zoom go from the start to the end "
                   "setting (zoom at constant speed). Every frame gets the same noise (the latent's batch_index "
                   "repeats), so the frames form one continuous pan / zoom. Sample with HDM Sampler or KSampler.")
    CATEGORY = "HDM/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("positive, one camera per frame", "negative, one camera per frame",
                       "the first latent repeated once per frame, all with the same noise index")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **CONDS,
            "latent": ("LATENT", {"tooltip": "Size of the frames (the first sample is used)."}),
            "frames": ("INT", {"default": 8, "min": 2, "max": 256, "tooltip": "Number of frames."}),
            "x_start": ("FLOAT", {"default": -0.5, **SHIFT}),
            "y_start": ("FLOAT", {"default": 0.0, **SHIFT}),
            "zoom_start": ("FLOAT", {"default": 1.0, **ZOOM}),
            "x_end": ("FLOAT", {"default": 0.5, **SHIFT}),
            "y_end": ("FLOAT", {"default": 0.0, **SHIFT}),
            "zoom_end": ("FLOAT", {"default": 1.0, **ZOOM}),
            "easing": (["linear", "ease_in_out"], {"default": "linear"}),
        }}

    def apply(self, positive, negative, latent, frames, x_start, y_start, zoom_start, x_end, y_end, zoom_end,
              easing="linear"):
        if frames < 2:
            raise ValueError(f"need frames >= 2, got {frames}")
        check_camera(x_start, y_start, zoom_start)
        check_camera(x_end, y_end, zoom_end)
        path = camera_path(frames, (x_start, y_start, zoom_start), (x_end, y_end, zoom_end), easing)
        samples = latent["samples"][:1]
        first = (latent.get("batch_index") or [0])[0]
        out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index", "noise_mask")}
        out.update(samples=samples.repeat(frames, *([1] * (samples.dim() - 1))), batch_index=[first] * frames)
        if "noise_mask" in latent:
            out["noise_mask"] = latent["noise_mask"][:1]
        return set_values(positive, path), set_values(negative, path), out
