"""The ScaleROPE picture of docs/comfyui.md, made in a real ComfyUI with this pack and the demo model.

    # from the repository root, with ComfyUI's own interpreter:
    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python -m demo.comfy_figures docs/scale_rope.png

ComfyUI runs in this process (its own interpreter, the CPU): the shipped demo checkpoint, "a red circle", seed 0,
through ComfyUI's ScaleROPE node (scale_x = scale_y, shift_x in tokens) and KSampler; each tile is labelled with
the HDM Camera it amounts to (nodes/positions.py `rope_camera`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [(1.25, 0.0), (1.0, 0.0), (0.8, 0.0), (1.0, -2.0), (1.0, 2.0)]  # (scale, shift_x in tokens)


def comfy():
    """ComfyUI's modules, imported in this process on the CPU, with the pack loaded as ComfyUI loads it."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (>= 0.8.0) and run with its Python")
    sys.argv, sys.path[:0] = [sys.argv[0], "--cpu"], [root]
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths

    import nodes

    folder_paths.add_model_folder_path("checkpoints", str(REPO / "demo" / "pretrained"))
    spec = importlib.util.spec_from_file_location("comfyui_hdm", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_hdm"] = pack
    spec.loader.exec_module(pack)
    return nodes


def main(out: str) -> None:
    torch.set_num_threads(1)
    nodes = comfy()
    from comfy_extras.nodes_rope import ScaleROPE
    from comfyui_hdm.hdm_core.pipeline import image_grid, to_pil
    from comfyui_hdm.nodes.loading import load_checkpoint
    from comfyui_hdm.nodes.positions import rope_camera

    model, clip, vae = load_checkpoint("hdm-demo.safetensors")
    pos = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    tiles = []
    for scale, shift in SETTINGS:
        patched = ScaleROPE.execute(model, scale, shift, scale, 0.0, 1.0, 0.0)[0]
        latent = {"samples": torch.zeros(1, 3, 32, 32)}
        out_latent = nodes.common_ksampler(patched, 0, 20, 3.0, "euler", "simple", pos, neg, latent)[0]
        image = vae.decode(out_latent["samples"])  # [1, H, W, 3]
        cam = rope_camera({"scale_x": scale, "scale_y": scale, "shift_x": shift}, (32, 32), patch=4)
        pic = to_pil(image.permute(0, 3, 1, 2))[0].resize((128, 128))
        label = f"scale {scale:g}, shift_x {shift:+g}"
        tiles.append((pic, label, f"= zoom {cam.zoom:.2f}, x_shift {cam.x_shift:+.2f}"))
    sheet = image_grid([labelled(*t) for t in tiles], len(tiles), pad=4, background=(220, 220, 220),
                       title="ComfyUI ScaleROPE on HDM (demo model, 'a red circle', seed 0): scale = 1 / zoom, "
                             "shift in tokens")
    sheet.save(out)
    print(f"wrote {out}")


def labelled(pic, line1: str, line2: str):
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (max(pic.width, 150), pic.height + 30), "white")
    tile.paste(pic, (0, 0))
    draw = ImageDraw.Draw(tile)
    draw.text((3, pic.height + 2), line1, fill="black")
    draw.text((3, pic.height + 15), line2, fill=(60, 60, 60))
    return tile


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "scale_rope.png")
