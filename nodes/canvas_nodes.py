"""HDM Tiled Diffusion and HDM Area Positions: MODEL patches that say where each model call sits on the canvas
(node shells: the work is in positions.py and hdm_core.canvas)."""

from __future__ import annotations

from .positions import POSITIONS, tiled_model, with_positions
from .schema import io, node_schema

CATEGORY = "HDM/canvas"
PX = {"min": 16, "max": 8192, "step": 16}


class HDMTiledDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMTiledDiffusion", display_name="HDM Tiled Diffusion", category=CATEGORY,
            search_aliases=("multidiffusion", "tiled diffusion", "hdm hires", "large image", "upscale tiles"),
            description=(
                "Renders images larger than HDM was trained for in overlapping tiles, so memory stays that of one "
                "tile: each tile is drawn with its true place on the canvas (its part of the canvas's position "
                "map), so the tiles make one picture instead of repeating the subject in every tile. Works with "
                "KSampler, HDM Sampler, img2img and area prompts. 1024 px tiles overlapping by 256 px suit the "
                "released model; smaller overlaps are faster but can show seams."),
            inputs=[
                io.Model.Input("model", tooltip="The HDM model to sample in tiles."),
                io.Int.Input("tile_width", default=1024, **PX, tooltip=(
                    "Tile width in pixels (a multiple of 16, one patch of the released model). HDM's training "
                    "size, 1024, is the natural choice; a tile as large as the image turns tiling off.")),
                io.Int.Input("tile_height", default=1024, **PX, tooltip="Tile height in pixels (a multiple of 16)."),
                io.Int.Input("overlap", default=256, min=0, max=4096, step=16, tooltip=(
                    "Pixels shared by neighbouring tiles, blended with weights that fade across them. A quarter of "
                    "the tile hides seams; must be smaller than the tile.")),
                io.Int.Input("tile_batch", default=1, min=1, max=64, tooltip=(
                    "Tiles drawn per model call: more is faster on a large GPU, 1 keeps memory at one tile's.")),
            ],
            outputs=[io.Model.Output(tooltip="The model, sampled in tiles by every sampler it goes to.")],
        )

    @classmethod
    def execute(cls, model, tile_width, tile_height, overlap, tile_batch) -> io.NodeOutput:
        return io.NodeOutput(tiled_model(model, tile_width, tile_height, overlap, tile_batch))


class HDMAreaPositions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            node_id="HDMAreaPositions", display_name="HDM Area Positions", category=CATEGORY,
            search_aliases=("area prompt positions", "regional prompt", "hdm regions"),
            description=(
                "What HDM is told about the place of each part of the image it draws separately: an area prompt "
                "(Conditioning Set Area, ...Percentage, a mask with set_area_to_bounds) or a tile. 'canvas' (the "
                "default, also without this node) gives every part its true place in the whole picture, as HDM "
                "was trained, so the parts make one picture. 'own' draws every part as a picture of its "
                "own, centred in its area (how area prompts work with other models, and this pack before): use "
                "it for separate subjects side by side."),
            inputs=[
                io.Model.Input("model", tooltip="The HDM model."),
                io.Combo.Input("positions", options=list(POSITIONS), default=POSITIONS[0], tooltip=(
                    "canvas: each area or tile at its true place (one coherent picture). own: each area or tile a "
                    "picture of its own (one complete subject per area).")),
            ],
            outputs=[io.Model.Output(tooltip="The model with this choice, for every sampler it goes to.")],
        )

    @classmethod
    def execute(cls, model, positions) -> io.NodeOutput:
        return io.NodeOutput(with_positions(model, positions))
