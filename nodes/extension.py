"""The pack as one ComfyExtension: the node classes ComfyUI registers (imported only by comfy_entrypoint)."""

from __future__ import annotations

from .canvas_nodes import HDMAreaPositions, HDMTiledDiffusion
from .conditioning_nodes import HDMCameraParam, HDMCameraSweep, HDMTextEncode, HDMTreadGamma
from .loader_nodes import HDMLoader, HDMSplitLoader
from .sampling_nodes import HDMEmptyLatent, HDMSampler
from .schema import ComfyExtension, io

NODES: list[type[io.ComfyNode]] = [HDMLoader, HDMSplitLoader, HDMTextEncode, HDMCameraParam, HDMTreadGamma,
                                   HDMSampler, HDMCameraSweep, HDMEmptyLatent, HDMTiledDiffusion, HDMAreaPositions]


class HDMExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
