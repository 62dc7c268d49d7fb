"""The figure of docs/comfyui.md's "Training a LoRA in ComfyUI": what a LoRA trained by ComfyUI's TrainLoraNode (the
example workflow example_workflows/hdm_lora_training.json) changed on the demo model, sampled by hdm_core with the
file SaveLoRA wrote (which tests/test_comfy_train_lora.py shows ComfyUI samples identically). Not a test module.

    python tests/make_train_lora_figure.py ComfyUI/output/loras/hdm_demo_orange_200_steps_00001_.safetensors \
        docs/comfyui_train_lora.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from demo.finetune import before_after
from demo.run import PRETRAINED, SHEET_GREY, with_legend
from hdm_core.checkpoint import load_components
from hdm_core.pipeline import image_grid, to_pil

SCALE = 3  # the demo's 32 px pictures, enlarged


def tiles(rows: list[dict]) -> list[Image.Image]:
    images = [to_pil(r["image"][None])[0] for r in rows]
    return [im.resize((im.width * SCALE, im.height * SCALE), Image.NEAREST) for im in images]


def figure(result: dict, lora: Path) -> Image.Image:
    """Rows: the new colour's prompts before / after, then the demo's own colours (seed 0) before / after."""
    new_b, new_a = result["before"]["new"], result["after"]["new"]
    old_b, old_a = result["before"]["old"], result["after"]["old"]
    seed0 = [r for r in old_b["rows"] if r["seed"] == 0], [r for r in old_a["rows"] if r["seed"] == 0]
    rows = [tiles(new_b["rows"]), tiles(new_a["rows"]), tiles(seed0[0]), tiles(seed0[1])]
    cols = max(len(r) for r in rows)
    blank = Image.new("RGB", rows[0][0].size, SHEET_GREY)
    sheet = image_grid([t for r in rows for t in r + [blank] * (cols - len(r))], cols, pad=4, background=SHEET_GREY)
    legend = [
        f"A LoRA trained in ComfyUI (TrainLoraNode, example workflow hdm_lora_training, 200 steps, CPU): {lora.name}",
        "Rows 1-2: 'an orange circle / square / triangle', seeds 0-3, on the demo model, then with the LoRA "
        f"(orange read in {new_b['colour_hits']}/{new_b['n']} -> {new_a['colour_hits']}/{new_a['n']}).",
        "Rows 3-4: the demo's own 15 prompts (5 colours x 3 shapes), seed 0, before and after: the colours it knew "
        f"are kept (all seeds: {old_b['colour_hits']}/{old_b['n']} -> {old_a['colour_hits']}/{old_a['n']}, shapes "
        f"{old_b['shape_hits']} -> {old_a['shape_hits']}).",
        "Sampled by hdm_core (12 Euler steps, CFG 3) with SaveLoRA's file; demo/measure.py reads the colours.",
    ]
    return with_legend(sheet, legend)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lora", type=Path, help="the LoRA file SaveLoRA wrote")
    p.add_argument("out", type=Path, help="the PNG to write")
    args = p.parse_args(argv)
    result = before_after(load_components(PRETRAINED, dtype=torch.float32), args.lora)
    figure(result, args.lora).save(args.out)
    counts = {when: {part: {k: v for k, v in f.items() if k != "rows"} for part, f in parts.items()}
              for when, parts in result.items()}
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
