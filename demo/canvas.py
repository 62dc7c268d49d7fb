"""What a region of a canvas is told about its place, measured on the demo model (trained, like HDM, on shifted
square crops that crop the position map: it draws its shape at the canvas origin, sized by the canvas).

    python -m demo.canvas                   # every scenario on demo/pretrained/hdm-demo.safetensors, 2-3 min
    python -m demo.canvas --seeds 1         # a quicker look

Each scenario runs the model on parts of a canvas larger than the 32 px it was trained at, in two ways: every part
gets its slice of the canvas's position map and the canvas's aspect ("canvas", hdm_core.canvas's default), or
every part is a picture of its own ("own": its own whole map and aspect, what area prompts and tiled samplers give
other models, and what this pack did before):
* tiles: a 64 x 64 canvas (twice the trained side) in 32 px tiles overlapping by 16, and the untiled call;
* composition: a 64 x 64 canvas, the prompt in the centre 32 x 32 area, an empty prompt around it;
* side by side: a 64 x 32 canvas, one prompt on each half;
* outpainting: a 32 x 32 picture padded by 16 or 32 px on the right and sampled with the picture kept (as
  ComfyUI's ImagePadForOutpaint + VAEEncodeForInpaint do), with the grown canvas's map or the camera under which
  the picture keeps its own coordinates (hdm_core.canvas.keep_picture_camera).
Writes demo_out/canvas/<scenario>.png (one row per way) and metrics.json; figures in demo/README.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hdm_core.canvas import IDENTITY, Camera, Region, blend, canvas_position_map, keep_picture_camera, region_inputs
from hdm_core.checkpoint import load_components
from hdm_core.cli import set_cpu_threads
from hdm_core.pipeline import GenerationParams, generate, image_grid, make_denoiser, seeded_noise, to_pil
from hdm_core.rope import aspect_info
from hdm_core.sampling import SAMPLERS, flow_sigmas
from training.toy_data import COLOURS, SHAPES, caption_for, parse_caption, prompts

from .measure import dominant_colour, foreground, label_blobs, measure
from .run import PRETRAINED, SAMPLE, positive_int, progress, with_legend

MIN_OBJECT = 0.01          # a blob of at least this fraction of the frame counts as an object
MODES = ("canvas", "own")


# ---------------------------------------------------------------------------------------------------
# Sampling a canvas region by region (ComfyUI's area combination: a weighted mean of the regions' outputs)
# ---------------------------------------------------------------------------------------------------

def regional_sample(comps: Any, size: tuple[int, int], regions: list[tuple[Region, str]], seed: int, mode: str,
                    camera: Camera = IDENTITY, keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """An image [3, H, W] of a canvas `size` = (H, W) px (pixel space) whose regions each have a prompt (the
    negative prompt is empty everywhere), every region given its place per `mode`. keep = (picture [3, H, W] in
    [0, 1], mask [H, W] True where it is kept): inpainting, the kept part re-noised to each step's level."""
    rows, cols = size
    model, te = comps.model, comps.text_encoder
    pos = canvas_position_map(rows, cols, camera)[None]
    aspect = torch.full((1,), aspect_info(rows, cols))
    uncond = te.encode([""])[0]
    denoisers = {}
    for region, prompt in regions:
        pos_r, aspect_r = region_inputs(pos, aspect, rows, cols, region, [camera] if mode == "own" else None)
        denoisers[region] = make_denoiser(model, te.encode([prompt])[0], uncond, SAMPLE["cfg"], pos_map=pos_r,
                                          aspect=aspect_r)
    weights = [torch.ones(r.height, r.width) for r, _ in regions]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return blend(x, [r for r, _ in regions], weights, lambda group: denoisers[group[0]](group[0].slice(x), sigma))
    noise = seeded_noise((1, 3, rows, cols), seed)
    if keep is not None:
        denoise = inpainting(denoise, keep[0][None] * 2 - 1, keep[1].float(), noise)
    with torch.no_grad():
        x = SAMPLERS["euler"](denoise, noise, flow_sigmas(SAMPLE["steps"]))
    return ((x[0] + 1) / 2).clamp(0, 1)


def inpainting(denoise: Callable, known: torch.Tensor, kept: torch.Tensor, noise: torch.Tensor) -> Callable:
    """ComfyUI's inpainting sampler on a flow model: where `kept` is 1 the input is the known image noised to the
    step's level (σ·noise + (1 − σ)·known) and the output is the known image."""
    def masked(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x = x * (1 - kept) + (sigma * noise + (1 - sigma) * known) * kept
        return denoise(x, sigma) * (1 - kept) + known * kept
    return masked


# ---------------------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------------------

def objects(image: torch.Tensor, where: np.ndarray | None = None) -> int:
    """Blobs of shape-coloured pixels of at least MIN_OBJECT of the frame (with `where`: mostly inside it)."""
    labels, sizes = label_blobs(foreground(image))
    frame = labels.size
    count = 0
    for k, size in enumerate(sizes, 1):
        if size >= MIN_OBJECT * frame and (where is None or where[labels == k].mean() > 0.5):
            count += 1
    return count


def follows(image: torch.Tensor, prompt: str) -> bool:
    """The largest object has the prompt's colour and shape."""
    m = measure(image)
    return (m.colour, m.shape) == parse_caption(prompt)


def half_colour(image: torch.Tensor, left: bool) -> str | None:
    arr = image.permute(1, 2, 0).numpy()
    half = arr[:, : arr.shape[1] // 2] if left else arr[:, arr.shape[1] // 2:]
    return dominant_colour(half)


# ---------------------------------------------------------------------------------------------------
# Scenarios: each returns (figures per mode, image rows per mode)
# ---------------------------------------------------------------------------------------------------

def tiles(comps: Any, cases: list[tuple[str, int]]) -> tuple[dict, dict]:
    """64 x 64 px in 32 px tiles overlapping by 16, tiles at their place or each a picture of its own; and the
    untiled call (one forward over the whole canvas) as the reference."""
    tiled = dict(tile_size=32, tile_overlap=16, tile_batch=9)
    ways = {"canvas": tiled, "own": dict(tiled, tile_positions="own"), "untiled": {}}
    figures, rows = {}, {}
    for way, tiling in ways.items():
        images = [generate(comps, GenerationParams(p, width=64, height=64, seed=s, **SAMPLE, **tiling))[0]
                  for p, s in progress(cases, f"tiles ({way})")]
        counts = [objects(img) for img in images]
        right = [c == 1 and follows(img, p) for c, img, (p, _) in zip(counts, images, cases)]
        figures[way] = {"one_object": counts.count(1), "one_right_object": sum(right), "n": len(images),
                        "mean_objects": float(np.mean(counts))}
        rows[way] = images
    return figures, rows


def composition(comps: Any, cases: list[tuple[str, int]]) -> tuple[dict, dict]:
    """64 x 64 px: the prompt on the centre 32 x 32, an empty prompt on the ring around it."""
    ring = [Region(0, 0, 16, 64), Region(48, 0, 16, 64), Region(16, 0, 32, 16), Region(16, 48, 32, 16)]
    figures, rows = {}, {}
    for mode in MODES:
        images = [regional_sample(comps, (64, 64), [(Region(16, 16, 32, 32), p)] + [(r, "") for r in ring], s, mode)
                  for p, s in progress(cases, f"composition ({mode})")]
        counts = [objects(img) for img in images]
        figures[mode] = {"one_right_object": sum(c == 1 and follows(img, p) for c, img, (p, _) in
                                                 zip(counts, images, cases)),
                         "n": len(images), "mean_objects": float(np.mean(counts))}
        rows[mode] = images
    return figures, rows


def side_by_side(comps: Any, pairs: list[tuple[str, str, int]]) -> tuple[dict, dict]:
    """64 x 32 px: one prompt on the left half, another on the right half."""
    left, right = Region(0, 0, 32, 32), Region(0, 32, 32, 32)
    figures, rows = {}, {}
    for mode in MODES:
        images = [regional_sample(comps, (32, 64), [(left, a), (right, b)], s, mode)
                  for a, b, s in progress(pairs, f"side by side ({mode})")]
        colours = [half_colour(img, True) == parse_caption(a)[0] and half_colour(img, False) == parse_caption(b)[0]
                   for img, (a, b, _) in zip(images, pairs)]
        counts = [objects(img) for img in images]
        figures[mode] = {"both_colours_right": sum(colours), "two_objects": counts.count(2), "n": len(images),
                         "mean_objects": float(np.mean(counts))}
        rows[mode] = images
    return figures, rows


def outpainting(comps: Any, cases: list[tuple[str, int]], pads: tuple[int, ...] = (16, 32)) -> tuple[dict, dict]:
    """A 32 x 32 picture padded by `pad` px on the right; the new part is sampled with the picture kept."""
    figures, rows = {}, {}
    for pad in pads:
        kept = torch.zeros(32, 32 + pad, dtype=torch.bool)
        kept[:, :32] = True
        ways = {"canvas": IDENTITY, "keep picture": keep_picture_camera(32, 32 + pad, Region(0, 0, 32, 32))}
        for way, camera in ways.items():
            images = []
            for p, s in progress(cases, f"outpainting {pad} px ({way})"):
                small = generate(comps, GenerationParams(p, width=32, height=32, seed=s, **SAMPLE))[0]
                known = torch.nn.functional.pad(small, (0, pad))
                images.append(regional_sample(comps, (32, 32 + pad), [(Region(0, 0, 32, 32 + pad), p)], s, "canvas",
                                              camera, keep=(known, kept)))
            key = f"{pad} px, {way}"
            figures[key] = {"new_object": sum(objects(img, ~kept.numpy()) > 0 for img in images), "n": len(images)}
            rows[key] = images
    return figures, rows


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def cases_for(seeds: int) -> tuple[list[tuple[str, int]], list[tuple[str, str, int]]]:
    """Every demo prompt with seeds 0 … seeds-1; and side-by-side pairs (two colours apart, shapes shifted)."""
    single = [(p, s) for s in range(seeds) for p in prompts()]
    names = list(COLOURS)
    pairs = [(caption_for(c, SHAPES[i % 3]), caption_for(names[(i + 2) % len(names)], SHAPES[(i + 1) % 3]), s)
             for s in range(seeds) for i, c in enumerate(names)]
    return single, pairs


def describe(figures: dict) -> list[str]:
    """One legend line per way: "canvas: one right object 28/30, mean objects 1.0"."""
    lines = []
    for way, fig in figures.items():
        n = fig["n"]
        parts = [f"{k.replace('_', ' ')} {v}/{n}" if isinstance(v, int) else f"{k.replace('_', ' ')} {v:.1f}"
                 for k, v in fig.items() if k != "n"]
        lines.append(f"{way}: " + ", ".join(parts))
    return lines


def sheet(rows: dict[str, list[torch.Tensor]], title: str, figures: dict, columns: int | None = None,
          scale: int = 3) -> Any:
    """One row of images per way (its first `columns`; smaller images padded to the largest), under a legend."""
    rows = {way: images[:columns] for way, images in rows.items()}
    pics = [to_pil(img[None])[0] for images in rows.values() for img in images]
    w, h = max(p.width for p in pics) * scale, max(p.height for p in pics) * scale
    tiles = []
    for pic in pics:
        tile = Image.new("RGB", (w, h), (220, 220, 220))
        tile.paste(pic.resize((pic.width * scale, pic.height * scale)), (0, 0))
        tiles.append(tile)
    grid = image_grid(tiles, len(next(iter(rows.values()))), pad=3, background=(220, 220, 220))
    return with_legend(grid, [title, f"Rows, top to bottom: {', '.join(rows)}. Over all images:", *describe(figures)])


SCENARIOS = {"tiles": "64 x 64 px in 32 px tiles overlapping by 16 (trained: 32 px)",
             "composition": "the prompt on the centre 32 x 32 of 64 x 64 px, an empty prompt around it",
             "side_by_side": "two prompts on the halves of 64 x 32 px",
             "outpainting": "32 x 32 px padded on the right, the picture kept"}


def run(checkpoint: Path, out: Path, seeds: int, columns: int | None = None) -> dict:
    comps = load_components(checkpoint, dtype=torch.float32)
    single, pairs = cases_for(seeds)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for name, scenario, cases in (("tiles", tiles, single), ("composition", composition, single),
                                  ("side_by_side", side_by_side, pairs), ("outpainting", outpainting, single)):
        figures, rows = scenario(comps, cases)
        metrics[name] = figures
        title = f"{name.replace('_', ' ')}: {SCENARIOS[name]}; demo model, {SAMPLE['steps']} Euler steps, CFG 3"
        sheet(rows, title, figures, columns).save(out / f"{name}.png")
        print(f"[canvas] {name}: {figures}", flush=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure position-true regions, tiles and outpainting on the demo model.")
    p.add_argument("--checkpoint", type=Path, default=PRETRAINED)
    p.add_argument("--out", type=Path, default=Path("demo_out/canvas"))
    p.add_argument("--seeds", type=positive_int, default=2, help="sampling seeds per prompt")
    p.add_argument("--columns", type=positive_int, help="images per row in the pictures (default: all)")
    args = p.parse_args(argv)
    set_cpu_threads()
    run(args.checkpoint, args.out, args.seeds, args.columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
