"""The prompt, camera, TREAD-gamma and camera-sweep nodes (node shells: the work is in conditioning.py).

HDMCameraParam and HDMTreadGamma keep the ids, inputs and widget order of the official HDM-ext pack, so its shared
workflows load unchanged.
"""

from __future__ import annotations

from ..hdm_core.canvas import Camera
from .conditioning import EASINGS, encode_official, sweep, with_camera, with_tread_gamma
from .schema import conditioning_inputs, conditioning_outputs, gamma_input, io, node_schema, shift_input, zoom_input

CATEGORY = "HDM/conditioning"
UNITS = "Units: 1.0 moves the view by half the image's long side."


class HDMTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMTextEncode", display_name="HDM Text Encode", category=CATEGORY,
            search_aliases=("hdm prompt", "qwen3 prompt", "text encode"),
            description=(
                "Turns a prompt into HDM conditioning exactly as the official HDM app does: the text goes to HDM's "
                "Qwen3 text encoder as written. Use it for the positive and the negative prompt. Unlike CLIP Text "
                "Encode it does not read (word:1.2) emphasis; for prompts without brackets both give the same "
                "result."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP output of HDM Checkpoint Loader or HDM Split Loader."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip=(
                    "What to draw (positive) or what to avoid (negative), tags or sentences. Sent as written: "
                    "brackets are ordinary characters here. An empty negative prompt is fine.")),
            ],
            outputs=[io.Conditioning.Output(tooltip=(
                "The encoded prompt: connect it to HDM Camera, HDM Tread Gamma or a sampler."))],
        )

    @classmethod
    def execute(cls, clip, text) -> io.NodeOutput:
        return io.NodeOutput(encode_official(clip, text))


class HDMCameraParam(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMCameraParam", display_name="HDM Camera", category=CATEGORY,
            search_aliases=("hdm camera", "pan", "zoom", "shift view"),
            description=(
                "Moves HDM's virtual camera over the scene without changing the prompt: x / y shift pan the view, "
                "zoom moves in or out, and the model draws what the camera would see. 0 / 0 / 1 (the defaults, as "
                "in the official app) leaves the image as it is. Useful range: shifts -1 to 1, zoom 0.5 to 2; "
                "further out the model draws places it rarely saw in training. " + UNITS),
            inputs=[
                *conditioning_inputs("view through this camera"),
                shift_input("x_shift", 0.0, "Pan right (above 0) or left (below 0). Sliders go from -5 to 5; "
                                            "-1 to 1 is the useful range. Official default 0. " + UNITS),
                shift_input("y_shift", 0.0, "Pan down (above 0) or up (below 0). Sliders go from -5 to 5; "
                                            "-1 to 1 is the useful range. Official default 0. " + UNITS),
                zoom_input("zoom", 1.0, "Above 1 zooms in (things get bigger), below 1 zooms out. Sliders go from "
                                        "0.2 to 5; 0.5 to 2 is the useful range. Official default 1."),
            ],
            outputs=conditioning_outputs("with the camera set"),
        )

    @classmethod
    def execute(cls, positive, negative, x_shift, y_shift, zoom) -> io.NodeOutput:
        return io.NodeOutput(*with_camera(positive, negative, Camera(x_shift, y_shift, zoom)))


class HDMTreadGamma(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMTreadGamma", display_name="HDM Tread Gamma", category=CATEGORY,
            search_aliases=("hdm tread", "tread guidance"),
            description=(
                "TREAD guidance: at every step, this fraction of the image skips the middle layers of HDM, "
                "separately for the positive and the negative prompt. A negative gamma above the positive one "
                "weakens the negative side, which strengthens the guidance. Official defaults: positive 0, "
                "negative 0.15. 0 on both turns it off. Each branch must stay below 1."),
            inputs=[
                *conditioning_inputs("set a TREAD gamma on"),
                gamma_input("positive_gamma", 0.0, "Fraction of the image that skips the middle layers on the "
                                                   "positive side, 0 to just under 1. Official default 0 (off)."),
                gamma_input("negative_gamma", 0.15, "Fraction of the image that skips the middle layers on the "
                                                    "negative side, 0 to just under 1. Official default 0.15; "
                                                    "0 turns TREAD guidance off."),
            ],
            outputs=conditioning_outputs("with its gamma"),
        )

    @classmethod
    def execute(cls, positive, negative, positive_gamma, negative_gamma) -> io.NodeOutput:
        return io.NodeOutput(*with_tread_gamma(positive, negative, positive_gamma, negative_gamma))


def sweep_ends(end: str, x: float, zoom: float) -> list[io.Float.Input]:
    """The x / y / zoom widgets of the sweep's start or end camera."""
    return [shift_input(f"x_{end}", x, f"Horizontal camera shift at the {end} (above 0 = right). " + UNITS),
            shift_input(f"y_{end}", 0.0, f"Vertical camera shift at the {end} (above 0 = down). " + UNITS),
            zoom_input(f"zoom_{end}", zoom, f"Zoom at the {end} (above 1 = closer). Try 1 to 2 for a zoom-in.")]


class HDMCameraSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMCameraSweep", display_name="HDM Camera Sweep", category=CATEGORY,
            search_aliases=("hdm pan animation", "camera move", "zoom animation"),
            description=(
                "Renders a camera move as a batch of frames, from the start camera to the end camera (shifts "
                "change evenly, zoom at a constant speed). Every frame starts from the same noise, so the frames "
                "form one smooth pan or zoom: save them with Save Animated WEBP. All frames are sampled together; "
                "use fewer frames if memory runs out. " + UNITS),
            inputs=[
                *conditioning_inputs("animate"),
                io.Latent.Input("latent", tooltip="Sets the frame size (only its first image is used): connect "
                                                  "HDM Empty Latent."),
                io.Int.Input("frames", default=8, min=2, max=256, tooltip=(
                    "Number of frames, 2 to 256. Each frame costs about one image of sampling time.")),
                *sweep_ends("start", -0.5, 1.0),
                *sweep_ends("end", 0.5, 1.0),
                io.Combo.Input("easing", options=list(EASINGS), default="linear", tooltip=(
                    "linear: constant speed; ease_in_out: starts and stops gently.")),
            ],
            outputs=[*conditioning_outputs("with one camera per frame"),
                     io.Latent.Output(display_name="latent", tooltip=(
                         "One copy of the latent per frame, all with the same noise: connect it to the sampler."))],
        )

    @classmethod
    def execute(cls, positive, negative, latent, frames, x_start, y_start, zoom_start, x_end, y_end, zoom_end,
                easing="linear") -> io.NodeOutput:
        start, end = Camera(x_start, y_start, zoom_start), Camera(x_end, y_end, zoom_end)
        return io.NodeOutput(*sweep(positive, negative, latent, frames, start, end, easing))
