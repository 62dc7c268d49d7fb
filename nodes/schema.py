"""ComfyUI's node schema as this pack uses it (imports comfy_api at the top: node shells only).

The schema API is imported from the versioned adapter `comfy_api.v0_0_2`, not from `comfy_api.latest` (the moving
target): in 0.8.0 it is the one adapter that exports `io` (v0_0_1 is a template), though 0.8.0 does not yet mark any
version stable. Fields a newer ComfyUI added to `io.Schema` are passed only where the running one has them: 0.8.0's
Schema has no `search_aliases`, and passing it there raises TypeError, which would stop the whole pack from loading.
"""

from __future__ import annotations

import dataclasses

from comfy_api.v0_0_2 import ComfyExtension, io

from .conditioning import GAMMA, SHIFT, ZOOM

__all__ = ["ComfyExtension", "io", "node_schema", "conditioning_inputs", "shift_input", "zoom_input", "gamma_input"]

SCHEMA_FIELDS = frozenset(f.name for f in dataclasses.fields(io.Schema))


def node_schema(*, search_aliases: tuple[str, ...] = (), **fields) -> io.Schema:
    """io.Schema(**fields), with `search_aliases` (other words the node search finds the node by) where this
    ComfyUI supports them."""
    if "search_aliases" in SCHEMA_FIELDS:
        fields["search_aliases"] = list(search_aliases)
    return io.Schema(**fields)


def conditioning_inputs(what: str) -> list[io.Input]:
    """The positive / negative pair every conditioning node edits; `what` completes "... to <what>"."""
    return [io.Conditioning.Input("positive", tooltip=f"The prompt conditioning (what to draw) to {what}."),
            io.Conditioning.Input("negative", tooltip=f"The negative conditioning (what to avoid) to {what}.")]


def conditioning_outputs(what: str) -> list[io.Output]:
    return [io.Conditioning.Output(display_name="positive", tooltip=f"The positive conditioning {what}."),
            io.Conditioning.Output(display_name="negative", tooltip=f"The negative conditioning {what}.")]


def shift_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, **SHIFT, display_mode=io.NumberDisplay.slider, tooltip=tooltip)


def zoom_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, **ZOOM, display_mode=io.NumberDisplay.slider, tooltip=tooltip)


def gamma_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, **GAMMA, display_mode=io.NumberDisplay.slider, tooltip=tooltip)
