"""The main job on a CPU-only machine: generate a shapes dataset, train a tiny pixel-space HDM with the bundled
launcher, export it in the released single-file layout, and draw a prompt grid and a camera strip.

    python -m demo.run --out demo_out                 # the recipe's 2,000 steps (about 4 min on 2 idle cores),
                                                      # fewer if a timing says they would take over 6.5 min
    python -m demo.run --out demo_out --minutes 5     # as many steps as fit in about 5 minutes of training
    python -m demo.run --out demo_out --steps 400     # a quick look (what tests/test_demo.py trains)

Writes demo_out/hdm-demo.safetensors (unet.model.* / te.text_models.0.* / vae.pixel_space_vae, opens with
hdm_core.checkpoint.load_components and ComfyUI's checkpoint loader), demo_out/grid.png, demo_out/camera_strip.png
and demo_out/metrics.json (prompt following and camera figures measured by demo/measure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from hdm_core.checkpoint import load_components
from hdm_core.pipeline import GenerationParams, generate, image_grid, to_pil
from hdm_core.rope import make_axial_pos
from hdm_core.xut import XUT
from training.recipe import load_recipe
from training.toy_data import make_dataset, parse_caption, prompts
from training.train import model_config

from .measure import chance_level, measure

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipe.toml"
REPO = HERE.parent
RECIPE_NAME = "hdm-demo"
SIZE = 32                       # the training resolution; generation happens at the same size
X_SHIFTS = (-0.5, -0.25, 0.0, 0.25, 0.5)
ZOOMS = (0.75, 0.87, 1.0, 1.15, 1.33)
CAMERA_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square")
SAMPLE = dict(steps=20, cfg=3.0, sampler="euler")
DEFAULT_TRAIN_MINUTES = 6.5     # cap on the recipe's step count when neither --steps nor --minutes is given
SHEET_GREY = (220, 220, 220)    # background of the picture sheets


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def launcher_command(data: Path, runs: Path, steps: int | None, recipe: Path = RECIPE,
                     extra: list[str] | None = None) -> list[str]:
    """The bundled launcher, exactly as a user would run it (one CPU process, no torchrun needed)."""
    cmd = [sys.executable, "-m", "training.train", "--config", str(recipe), "--device", "cpu",
           f'data.path="{data.as_posix()}"', f'run.out_dir="{runs.as_posix()}"']
    if steps:
        cmd.append(f"train.max_steps={steps}")
    return cmd + list(extra or [])


def estimate_step_seconds(recipe: Path = RECIPE, overrides: list[str] | None = None, trials: int = 6) -> float:
    """Seconds per optimizer step of the recipe's model and batch on this machine, now (forward, backward, AdamW),
    plus a margin for data loading and the text encoder."""

    r = load_recipe(recipe, overrides or [])
    cfg = model_config(r, None)
    model = XUT(cfg)
    model.init_for_training()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, res = r.train.batch_size * r.train.grad_accum, r.data.resolution
    x = torch.randn(b, cfg.input_dim, res, res)
    ctx = torch.randn(b, r.model.max_length, cfg.ctx_dim)
    pos = make_axial_pos(res, res)[None].expand(b, -1, -1)
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        v = model(x, torch.rand(b), ctx, pos_map=pos, aspect=torch.zeros(b), tread_rate=r.model.tread_rate or None)
        v.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:])) * 1.25


def train(data: Path, runs: Path, steps: int | None, recipe: Path = RECIPE, extra: list[str] | None = None,
          quiet: bool = False) -> Path:
    """Run the launcher in a subprocess from a fresh run folder → path of its released-layout export."""
    shutil.rmtree(runs / RECIPE_NAME, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = launcher_command(data, runs, steps, recipe, extra)
    if not quiet:
        print("$ " + " ".join(cmd[1:]).replace(str(REPO) + os.sep, ""), flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=quiet, text=True)
    if done.returncode:
        tail = (done.stdout or "")[-2000:] + (done.stderr or "")[-4000:] if quiet else ""
        raise RuntimeError(f"training failed (exit {done.returncode}){': ' + tail if tail else ''}")
    export = runs / RECIPE_NAME / "export" / f"{RECIPE_NAME}.safetensors"
    if not export.is_file():
        raise RuntimeError(f"the launcher finished but wrote no export at {export}")
    return export


# ---------------------------------------------------------------------------------------------------
# Sampling and measuring
# ---------------------------------------------------------------------------------------------------

def generate_one(components: Any, prompt: str, seed: int, *, x_shift: float = 0.0, zoom: float = 1.0,
                 size: int = SIZE, **sample: Any) -> torch.Tensor:
    """One image [3, H, W] in [0, 1] through the public pipeline (camera map always passed)."""
    params = GenerationParams(prompt, width=size, height=size, seed=seed, x_shift=x_shift, zoom=zoom,
                              **{**SAMPLE, **sample})
    return generate(components, params)[0]


def prompt_following(components: Any, prompt_list: list[str], seeds: list[int], **sample: Any) -> dict[str, Any]:
    """Generate every prompt with every seed; accuracy of the dominant colour and of the shape."""
    rows = []
    for seed in seeds:
        for p in prompt_list:
            img = generate_one(components, p, seed, **sample)
            m = measure(img)
            colour, shape = parse_caption(p)
            rows.append({"prompt": p, "seed": seed, "image": img, "colour": m.colour, "shape": m.shape,
                         "colour_ok": m.colour == colour, "shape_ok": m.shape == shape})
    n = len(rows)
    return {"rows": rows, "n": n,
            "colour_accuracy": sum(r["colour_ok"] for r in rows) / n,
            "shape_accuracy": sum(r["shape_ok"] for r in rows) / n,
            "both_accuracy": sum(r["colour_ok"] and r["shape_ok"] for r in rows) / n}


def camera_figures(components: Any, prompt_list: list[str], seeds: list[int], **sample: Any) -> dict[str, Any]:
    """Per (prompt, seed): centroid x at x_shift ±0.5 and shape area at zoom 0.75 / 1.33 (same noise)."""
    pairs = []
    for seed in seeds:
        for p in prompt_list:
            left = measure(generate_one(components, p, seed, x_shift=0.5, **sample))     # content moves left
            right = measure(generate_one(components, p, seed, x_shift=-0.5, **sample))   # content moves right
            small = measure(generate_one(components, p, seed, zoom=0.75, **sample))
            big = measure(generate_one(components, p, seed, zoom=1.33, **sample))
            pairs.append({"prompt": p, "seed": seed, "cx_shift_plus": left.cx, "cx_shift_minus": right.cx,
                          "area_zoom_075": small.area, "area_zoom_133": big.area})
    dx = np.array([q["cx_shift_plus"] - q["cx_shift_minus"] for q in pairs])
    ratio = np.array([q["area_zoom_133"] / max(q["area_zoom_075"], 1e-3) for q in pairs])
    return {"pairs": pairs, "n": len(pairs),
            # centroid x (frame units, width spans [-1, 1]) at x_shift=+0.5 minus at x_shift=-0.5; ideal -1.0
            "mean_dx": float(np.nanmean(dx)),
            "fraction_moved_left": float(np.mean(np.nan_to_num(dx, nan=1.0) < 0)),
            # area at zoom 1.33 / area at zoom 0.75; ideal (1.33 / 0.75)^2 ≈ 3.1
            "median_area_ratio": float(np.median(ratio)),
            "fraction_grew": float(np.mean(ratio > 1))}


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------

def _tile(img: torch.Tensor, label: str, scale: int, mark: str | None = None) -> Any:
    pic = to_pil(img[None])[0]
    pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    tile = Image.new("RGB", (pic.width, pic.height + 28), "white")
    tile.paste(pic, (0, 0))
    draw = ImageDraw.Draw(tile)
    draw.text((3, pic.height + 2), label, fill="black")
    if mark:
        draw.text((3, pic.height + 14), mark, fill=(0, 120, 0) if mark.startswith("ok") else (170, 0, 0))
    return tile


def write_grid(follow: dict[str, Any], path: Path, cols: int = 6, scale: int = 4) -> None:
    """One row per colour: each shape with each seed, labelled with what demo.measure reads in it."""
    order = {p: i for i, p in enumerate(prompts())}
    tiles = []
    for r in sorted(follow["rows"], key=lambda r: (order.get(r["prompt"], len(order)), r["seed"])):
        mark = ("ok " if r["colour_ok"] else "x ") + f"{r['colour']}, {r['shape']}"
        tiles.append(_tile(r["image"], f"{r['prompt'][2:]} s{r['seed']}", scale, mark))
    title = (f"colour {follow['colour_accuracy']:.0%} / shape {follow['shape_accuracy']:.0%} "
             f"(chance {chance_level()['colour']:.0%} / {chance_level()['shape']:.0%})")
    image_grid(tiles, cols, pad=4, background=SHEET_GREY, title=title).save(path)


def write_camera_strip(components: Any, prompt: str, seed: int, path: Path, scale: int = 4, **sample: Any) -> None:
    """Row 1: x_shift -0.5 … 0.5 (content moves left as the camera moves right); row 2: zoom 0.75 … 1.33."""
    tiles = [_tile(generate_one(components, prompt, seed, x_shift=x, **sample), f"x_shift {x:+.2f}", scale)
             for x in X_SHIFTS]
    tiles += [_tile(generate_one(components, prompt, seed, zoom=z, **sample), f"zoom {z:.2f}", scale)
              for z in ZOOMS]
    image_grid(tiles, len(X_SHIFTS), pad=4, background=SHEET_GREY, title=f'"{prompt}", seed {seed}').save(path)


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train and show a tiny HDM on generated shapes (CPU, minutes).")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=0,
                        help=f"optimizer steps (default: the recipe's, capped to ~{DEFAULT_TRAIN_MINUTES:g} min)")
    budget.add_argument("--minutes", type=float, default=0.0,
                        help="training time budget; the step count is set from a short timing of this machine")
    p.add_argument("--images", type=int, default=3000, help="size of the generated dataset")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides passed to the launcher")
    return p.parse_args(argv)


def choose_steps(args: argparse.Namespace) -> int:
    """--steps, or as many steps as fit in --minutes; by default the recipe's, capped to DEFAULT_TRAIN_MINUTES."""
    if args.steps:
        return args.steps
    recipe_steps = load_recipe(args.recipe, args.overrides).train.max_steps
    per_step = estimate_step_seconds(args.recipe, args.overrides)
    fit = max(10, int((args.minutes or DEFAULT_TRAIN_MINUTES) * 60 / per_step))
    steps = fit if args.minutes else min(recipe_steps, fit)
    print(f"[demo] about {per_step * 1000:.0f} ms per training step on this machine now: {steps} steps "
          f"(~{steps * per_step / 60:.1f} min)", flush=True)
    return steps


def evaluate(checkpoint: Path, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prompt following and camera figures of the exported model; writes grid.png and camera_strip.png."""
    torch.manual_seed(0)
    comps = load_components(checkpoint, dtype=torch.float32)
    follow = prompt_following(comps, prompts(), seeds=[0, 1])
    write_grid(follow, out / "grid.png")
    write_camera_strip(comps, CAMERA_PROMPTS[0], 0, out / "camera_strip.png")
    return follow, camera_figures(comps, list(CAMERA_PROMPTS), seeds=[0, 1])


def summarise(follow: dict[str, Any], camera: dict[str, Any], timings: dict[str, float], checkpoint: Path,
              out: Path) -> dict[str, Any]:
    """metrics.json and the closing report."""
    chance = chance_level()
    metrics = {
        "colour_accuracy": follow["colour_accuracy"], "shape_accuracy": follow["shape_accuracy"],
        "both_accuracy": follow["both_accuracy"], "n_images": follow["n"], "chance": chance,
        **{k: v for k, v in camera.items() if k != "pairs"}, "camera_pairs": camera["pairs"],
        "timings": timings, "sampling": SAMPLE, "checkpoint": str(checkpoint),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[demo] prompt following over {follow['n']} images: colour {follow['colour_accuracy']:.0%} "
          f"(chance {chance['colour']:.0%}), shape {follow['shape_accuracy']:.0%} (chance {chance['shape']:.0%})")
    print(f"[demo] camera over {camera['n']} prompt/seed pairs: x_shift +0.5 vs -0.5 moves the centroid by "
          f"{camera['mean_dx']:+.2f} (left in {camera['fraction_moved_left']:.0%}; ideal -1.0); zoom 1.33 vs "
          f"0.75 scales the area by {camera['median_area_ratio']:.2f}x (grew in {camera['fraction_grew']:.0%}; "
          f"ideal 3.1x)")
    print(f"[demo] timings: dataset {timings['dataset_s']:.0f} s, training {timings['train_s']:.0f} s, "
          f"sampling {timings['sample_s']:.0f} s, total {timings['total_s']:.0f} s")
    print(f"[demo] wrote {out / 'grid.png'}, {out / 'camera_strip.png'}, {out / 'metrics.json'}, {checkpoint}")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    shutil.rmtree(out / "data", ignore_errors=True)  # the demo's own folder: no stale images from an earlier run
    data = make_dataset(out / "data", args.images, args.seed)
    timings["dataset_s"] = time.perf_counter() - t0
    print(f"[demo] dataset: {args.images} captioned shape images in {data} ({timings['dataset_s']:.1f} s)", flush=True)

    steps = choose_steps(args)
    t0 = time.perf_counter()
    export = train(data, out / "runs", steps, args.recipe, args.overrides)
    timings["train_s"] = time.perf_counter() - t0
    final = out / "hdm-demo.safetensors"
    shutil.copyfile(export, final)
    print(f"[demo] trained in {timings['train_s']:.0f} s; released single-file layout: {final}", flush=True)

    t0 = time.perf_counter()
    follow, camera = evaluate(final, out)
    timings["sample_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    return summarise(follow, camera, timings, final, out)


if __name__ == "__main__":
    main()
