"""The main job on a CPU-only machine: generate a shapes dataset, train a tiny pixel-space HDM with the bundled
launcher, export it in the released single-file layout, draw a prompt grid and a camera strip, and say whether
the model follows the prompt and the camera (exit 1 when a figure is near chance).

    python -m demo.run                        # the recipe's 600 steps: 2 min on 2 idle cores, 5 on busy ones
    python -m demo.run --pretrained           # no training: the shipped demo/pretrained/hdm-demo.safetensors
    python -m demo.run --steps 300            # a quicker look: any step count, never fewer than asked

The step count never depends on the machine's speed, and every process runs a fixed number of CPU threads
(training.runtime.set_cpu_threads: 1, or OMP_NUM_THREADS), so the same seed gives the same weights and images on
a busy machine as on a quiet one. Writes demo_out/hdm-demo.safetensors (unet.model.* / te.text_models.0.* /
vae.pixel_space_vae; opens with hdm_core.checkpoint.load_components and ComfyUI's checkpoint loader),
demo_out/grid.png, demo_out/camera_strip.png and demo_out/metrics.json (figures measured by demo/measure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from hdm_core.canvas import IDENTITY, Camera, canvas_position_map
from hdm_core.checkpoint import load_components
from hdm_core.pipeline import image_grid, make_denoiser, seeded_noise, to_pil
from hdm_core.sampling import SAMPLERS, flow_sigmas
from training.runtime import set_cpu_threads
from training.toy_data import make_dataset, parse_caption, prompts

from .measure import chance_level, measure

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipe.toml"
PRETRAINED = HERE / "pretrained" / "hdm-demo.safetensors"
REPO = HERE.parent
RECIPE_NAME = "hdm-demo"
SIZE = 32                       # the training resolution; generation happens at the same size
X_SHIFTS = (-0.5, -0.25, 0.0, 0.25, 0.5)
ZOOMS = (0.75, 0.87, 1.0, 1.15, 1.33)
CAMERA_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square")
SEEDS = (0, 1)                  # sampling seeds of the grid and the camera figures
SAMPLE = dict(steps=20, cfg=3.0, sampler="euler")
SHEET_GREY = (220, 220, 220)    # background of the picture sheets

# The verdict: every figure must be well above what a model that ignores the prompt or the camera gets.
# Chance: colour 1/5, shape 1/3; a camera direction that came out by accident is right half the time.
THRESHOLDS = {
    "colour_accuracy": 0.6,        # 18 of 30: P(guessing reaches it) = 2e-6
    "shape_accuracy": 0.6,         # 18 of 30: P = 2e-3
    "fraction_moved_left": 0.8,    # 8 of 10 pairs: P = 0.055, and the mean shift must be half the ideal -1.0
    "mean_dx": -0.5,
    "fraction_grew": 0.8,          # 8 of 10 pairs, and a median area ratio of 1.5 (none: 1.0, ideal 3.1)
    "median_area_ratio": 1.5,
}


def progress(items: Iterable[Any], desc: str, total: int | None = None, unit: str = "img") -> Iterator[Any]:
    """A tqdm bar with an ETA on stdout (every 10 s when stdout is a file or a pipe)."""
    return tqdm(items, desc=f"[demo] {desc}", total=total, unit=unit, file=sys.stdout, dynamic_ncols=True,
                mininterval=0.5 if sys.stdout.isatty() else 10.0)


def repo_relative(path: Path) -> str:
    """`path` relative to the repository when inside it (the launcher runs there, and the export's metadata
    then names no machine-specific folder), else absolute."""
    path = path.resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.as_posix()


# ---------------------------------------------------------------------------------------------------
# Data and training
# ---------------------------------------------------------------------------------------------------

def write_dataset(root: Path, n: int, seed: int) -> Path:
    """training.toy_data's shapes (what make_dataset writes), with a progress bar; an earlier run's files go."""
    shutil.rmtree(root, ignore_errors=True)
    return make_dataset(root, n, seed, progress=lambda samples: progress(samples, "dataset", total=n))


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (the demo's step, image and seed counts)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return value


def launcher_command(data: Path, runs: Path, steps: int | None, recipe: Path = RECIPE,
                     extra: list[str] | None = None) -> list[str]:
    """The bundled launcher, exactly as a user would run it (one CPU process, no torchrun needed)."""
    cmd = [sys.executable, "-m", "training.train", "--config", repo_relative(recipe), "--device", "cpu",
           f'data.path="{repo_relative(data)}"', f'run.out_dir="{repo_relative(runs)}"']
    if steps:
        cmd.append(f"train.max_steps={steps}")
    return cmd + list(extra or [])


def train(data: Path, runs: Path, steps: int | None, recipe: Path = RECIPE, extra: list[str] | None = None,
          quiet: bool = False, name: str = RECIPE_NAME) -> Path:
    """Run the launcher in a subprocess from a fresh run folder (runs/name; a `name` other than the recipe's is
    passed as an override) → path of its export. Its progress bar (with the ETA) shows in this process's output
    unless `quiet`."""
    shutil.rmtree(runs / name, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = launcher_command(data, runs, steps, recipe, [*([f"name={name}"] if name != RECIPE_NAME else []),
                                                       *(extra or [])])
    if not quiet:
        print("$ python " + " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=quiet, text=True)
    if done.returncode:
        tail = (done.stdout or "")[-2000:] + (done.stderr or "")[-4000:] if quiet else ""
        raise RuntimeError(f"training failed (exit {done.returncode}){': ' + tail if tail else ''}")
    export = runs / name / "export" / f"{name}.safetensors"
    if not export.is_file():
        raise RuntimeError(f"the launcher finished but wrote no export at {export}")
    return export


# ---------------------------------------------------------------------------------------------------
# Sampling and measuring
# ---------------------------------------------------------------------------------------------------

Case = tuple[str, int, Camera]  # (prompt, sampling seed, camera)


@torch.no_grad()
def generate_batch(components: Any, cases: list[Case], size: int = SIZE, desc: str | None = None,
                   **sample: Any) -> torch.Tensor:
    """Images [N, 3, H, W] for every (prompt, seed, camera) at once (CFG with the empty negative prompt): what
    hdm_core.pipeline.generate draws for each, up to float rounding (tests/test_demo_canvas.py), several times
    faster on a CPU. Prompts of one token count share a forward. With `desc`, a progress bar over the steps.
    `sample` may change steps, cfg and sampler."""
    if set(sample) - set(SAMPLE):
        raise ValueError(f"generate_batch takes {sorted(SAMPLE)}, not {sorted(set(sample) - set(SAMPLE))}")
    settings = {**SAMPLE, **sample}
    model, te = components.model, components.text_encoder
    contexts = te.encode([p for p, _, _ in cases])
    uncond = te.encode([""])[0]
    out = torch.empty(len(cases), 3, size, size)
    lengths = sorted({c.shape[1] for c in contexts})
    bar = progress(range(settings["steps"] * len(lengths)), desc, unit="step") if desc else None
    for length in lengths:
        idx = [i for i, c in enumerate(contexts) if c.shape[1] == length]
        maps = torch.stack([canvas_position_map(size, size, cases[i][2]) for i in idx])
        denoise = make_denoiser(model, torch.cat([contexts[i] for i in idx]), uncond, settings["cfg"], pos_map=maps,
                                aspect=torch.zeros(len(idx)))
        noise = torch.cat([seeded_noise((1, 3, size, size), cases[i][1]) for i in idx])
        latents = SAMPLERS[settings["sampler"]](denoise, noise, flow_sigmas(settings["steps"]),
                                                callback=None if bar is None else lambda _: bar.update())
        out[idx] = components.vae.decode(latents)
    if bar is not None:
        bar.close()
    return out


def prompt_following(components: Any, prompt_list: list[str], seeds: Iterable[int], **sample: Any) -> dict[str, Any]:
    """Generate every prompt with every seed; accuracy of the colour and of the shape demo.measure reads."""
    cases = [(p, seed, IDENTITY) for seed in seeds for p in prompt_list]
    rows = []
    images = generate_batch(components, cases, desc=f"prompt grid ({len(cases)} images)", **sample)
    for (p, seed, _), img in zip(cases, images):
        m = measure(img)
        colour, shape = parse_caption(p)
        rows.append({"prompt": p, "seed": seed, "image": img, "colour": m.colour, "shape": m.shape,
                     "colour_ok": m.colour == colour, "shape_ok": m.shape == shape})
    n = len(rows)
    return {"rows": rows, "n": n,
            "colour_hits": sum(r["colour_ok"] for r in rows), "shape_hits": sum(r["shape_ok"] for r in rows),
            "colour_accuracy": sum(r["colour_ok"] for r in rows) / n,
            "shape_accuracy": sum(r["shape_ok"] for r in rows) / n,
            "both_accuracy": sum(r["colour_ok"] and r["shape_ok"] for r in rows) / n}


CAMERA_TESTS = (Camera(x_shift=0.5), Camera(x_shift=-0.5), Camera(zoom=0.75), Camera(zoom=1.33))


def camera_figures(components: Any, prompt_list: list[str], seeds: Iterable[int], **sample: Any) -> dict[str, Any]:
    """Per (prompt, seed): centroid x at x_shift ±0.5 and shape area at zoom 0.75 / 1.33 (same noise)."""
    pairs = [(p, seed) for seed in seeds for p in prompt_list]
    images = generate_batch(components, [(p, seed, cam) for p, seed in pairs for cam in CAMERA_TESTS],
                            desc=f"camera figures ({4 * len(pairs)} images)", **sample)
    rows = []
    for k, (p, seed) in enumerate(pairs):
        left, right, small, big = (measure(img) for img in images[4 * k: 4 * k + 4])  # camera right: content left
        rows.append({"prompt": p, "seed": seed, "cx_shift_plus": left.cx, "cx_shift_minus": right.cx,
                     "area_zoom_075": small.area, "area_zoom_133": big.area})
    dx = np.array([q["cx_shift_plus"] - q["cx_shift_minus"] for q in rows])
    ratio = np.array([q["area_zoom_133"] / max(q["area_zoom_075"], 1e-3) for q in rows])
    return {"pairs": rows, "n": len(rows),
            # centroid x (frame units, width spans [-1, 1]) at x_shift=+0.5 minus at x_shift=-0.5; ideal -1.0
            "mean_dx": float(np.nanmean(dx)) if np.isfinite(dx).any() else 0.0,
            "moved_left": int(np.sum(np.nan_to_num(dx, nan=1.0) < 0)),
            "fraction_moved_left": float(np.mean(np.nan_to_num(dx, nan=1.0) < 0)),
            # area at zoom 1.33 / area at zoom 0.75; ideal (1.33 / 0.75)^2 ≈ 3.1
            "median_area_ratio": float(np.median(ratio)),
            "grew": int(np.sum(ratio > 1)),
            "fraction_grew": float(np.mean(ratio > 1))}


def verdict(follow: dict[str, Any], camera: dict[str, Any]) -> tuple[bool, str]:
    """(passed, one line): each figure against chance and THRESHOLDS."""
    chance, t = chance_level(), THRESHOLDS
    checks = [
        (follow["colour_accuracy"] >= t["colour_accuracy"],
         f"colour {follow['colour_hits']}/{follow['n']} (chance {chance['colour']:.0%}, need "
         f"{t['colour_accuracy']:.0%})"),
        (follow["shape_accuracy"] >= t["shape_accuracy"],
         f"shape {follow['shape_hits']}/{follow['n']} (chance {chance['shape']:.0%}, need {t['shape_accuracy']:.0%})"),
        (camera["fraction_moved_left"] >= t["fraction_moved_left"] and camera["mean_dx"] <= t["mean_dx"],
         f"x_shift moved the shape left in {camera['moved_left']}/{camera['n']} by {camera['mean_dx']:+.2f} "
         f"(chance 50% by 0, need {t['fraction_moved_left']:.0%} by {t['mean_dx']:+.1f})"),
        (camera["fraction_grew"] >= t["fraction_grew"] and camera["median_area_ratio"] >= t["median_area_ratio"],
         f"zoom grew it in {camera['grew']}/{camera['n']} by x{camera['median_area_ratio']:.2f} "
         f"(chance 50% by x1, need {t['fraction_grew']:.0%} by x{t['median_area_ratio']:g})"),
    ]
    passed = all(ok for ok, _ in checks)
    if passed:
        return True, "PASS: " + "; ".join(text for _, text in checks)
    return False, "FAIL, near chance: " + "; ".join(text for ok, text in checks if not ok)


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------

def _tile(img: torch.Tensor, label: str, scale: int, mark: str | None = None, ok: bool = True) -> Any:
    pic = to_pil(img[None])[0]
    pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    tile = Image.new("RGB", (pic.width, pic.height + 28), "white")
    tile.paste(pic, (0, 0))
    draw = ImageDraw.Draw(tile)
    draw.text((3, pic.height + 2), label, fill="black")
    if mark:
        draw.text((3, pic.height + 14), mark, fill=(0, 120, 0) if ok else (170, 0, 0))
    return tile


def with_legend(sheet: Any, lines: list[str]) -> Any:
    """The sheet below a few lines of text that say how to read it."""
    out = Image.new("RGB", (max(sheet.width, 760), sheet.height + 14 * len(lines) + 8), SHEET_GREY)
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, 4 + 14 * i), line, fill="black")
    out.paste(sheet, (0, 14 * len(lines) + 8))
    return out


def write_grid(follow: dict[str, Any], path: Path, cols: int = 6, scale: int = 4) -> None:
    """One row per colour: each shape with each seed, labelled with what demo.measure reads in it."""
    order = {p: i for i, p in enumerate(prompts())}
    tiles = []
    for r in sorted(follow["rows"], key=lambda r: (order.get(r["prompt"], len(order)), r["seed"])):
        ok = r["colour_ok"] and r["shape_ok"]
        tiles.append(_tile(r["image"], f"{r['prompt'][2:]} s{r['seed']}", scale,
                           f"{'ok' if ok else 'x'} {r['colour'] or '-'} {r['shape'] or '-'}", ok))
    chance = chance_level()
    legend = [
        f"Prompt following: colour right in {follow['colour_hits']}/{follow['n']}, shape right in "
        f"{follow['shape_hits']}/{follow['n']} (guessing: {chance['colour']:.0%} / {chance['shape']:.0%}).",
        f"Each tile: the prompt \"a <colour> <shape>\" and sN = sampling seed N (the starting noise); "
        f"{SAMPLE['steps']} Euler steps, CFG {SAMPLE['cfg']:g}.",
        "Second line: the colour and shape demo/measure.py reads in the image. ok = both match the prompt; "
        "x = at least one does not.",
    ]
    grid = image_grid(tiles, cols, pad=4, background=SHEET_GREY)
    with_legend(grid, legend).save(path)


def write_camera_strip(components: Any, prompt: str, seed: int, path: Path, scale: int = 4, **sample: Any) -> None:
    """Row 1: x_shift -0.5 … 0.5 (content moves left as the camera moves right); row 2: zoom 0.75 … 1.33."""
    cameras = [Camera(x_shift=x) for x in X_SHIFTS] + [Camera(zoom=z) for z in ZOOMS]
    images = generate_batch(components, [(prompt, seed, cam) for cam in cameras],
                            desc=f"camera strip ({len(cameras)} images)", **sample)
    tiles = []
    for camera, img in zip(cameras, images):
        label = f"x_shift {camera.x_shift:+.2f}" if camera.zoom == 1 else f"zoom {camera.zoom:.2f}"
        tiles.append(_tile(img, label, scale))
    legend = [f'Camera: "{prompt}", seed {seed}, the same starting noise in every tile.',
              "Row 1: x_shift moves the camera right, so the shape moves left. Row 2: zoom in, the shape grows."]
    with_legend(image_grid(tiles, len(X_SHIFTS), pad=4, background=SHEET_GREY), legend).save(path)


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train and show a tiny HDM on generated shapes (CPU, minutes).")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--pretrained", type=Path, nargs="?", const=PRETRAINED, default=None, metavar="FILE",
                   help=f"skip training: sample the shipped {PRETRAINED.relative_to(REPO)} (or FILE)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (default: the recipe's train.max_steps)")
    p.add_argument("--images", type=positive_int, default=3000, help="size of the generated dataset")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides passed to the launcher")
    return p.parse_args(argv)


def evaluate(checkpoint: Path, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prompt following and camera figures of the exported model; writes grid.png and camera_strip.png."""
    comps = load_components(checkpoint, dtype=torch.float32)
    follow = prompt_following(comps, prompts(), SEEDS)
    write_grid(follow, out / "grid.png")
    write_camera_strip(comps, CAMERA_PROMPTS[0], 0, out / "camera_strip.png")
    return follow, camera_figures(comps, list(CAMERA_PROMPTS), SEEDS)


def summarise(follow: dict[str, Any], camera: dict[str, Any], timings: dict[str, float], checkpoint: Path,
              out: Path, threads: int) -> dict[str, Any]:
    """metrics.json and the closing report, ending with the verdict."""
    passed, line = verdict(follow, camera)
    metrics = {
        "passed": passed, "verdict": line, "thresholds": THRESHOLDS, "chance": chance_level(),
        **{k: v for k, v in follow.items() if k != "rows"},
        **{k: v for k, v in camera.items() if k != "pairs"}, "camera_pairs": camera["pairs"],
        "timings": timings, "sampling": SAMPLE, "checkpoint": str(checkpoint),
        "torch": torch.__version__, "cpu_threads": threads,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"[demo] camera over {camera['n']} prompt/seed pairs: x_shift +0.5 vs -0.5 moves the centroid by "
          f"{camera['mean_dx']:+.2f} (ideal -1.0); zoom 1.33 vs 0.75 scales the area by "
          f"{camera['median_area_ratio']:.2f}x (ideal 3.1x)")
    print("[demo] timings: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()))
    print(f"[demo] wrote {out / 'grid.png'}, {out / 'camera_strip.png'}, {out / 'metrics.json'}")
    print(f"[demo] verdict: {line}", flush=True)
    return metrics


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole demo → metrics (also in out/metrics.json)."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = set_cpu_threads()
    print(f"[demo] torch {torch.__version__}, {threads} CPU thread(s) per process (set OMP_NUM_THREADS to change; "
          f"another count gives slightly different weights)", flush=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    if args.pretrained:
        checkpoint = args.pretrained.resolve()
        print(f"[demo] no training: sampling {repo_relative(checkpoint)}", flush=True)
    else:
        t0 = time.perf_counter()
        data = write_dataset(out / "data", args.images, args.seed)
        timings["dataset_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        export = train(data, out / "runs", args.steps, args.recipe, args.overrides)
        timings["train_s"] = time.perf_counter() - t0
        checkpoint = out / "hdm-demo.safetensors"
        shutil.copyfile(export, checkpoint)
        print(f"[demo] trained in {timings['train_s']:.0f} s; released single-file layout: {checkpoint}", flush=True)
    t0 = time.perf_counter()
    follow, camera = evaluate(checkpoint, out)
    timings["sample_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    return summarise(follow, camera, timings, checkpoint, out, threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = run(args)
    if metrics["passed"]:
        return 0
    hint = "" if args.pretrained else (f" Training log: {args.out / 'runs' / RECIPE_NAME / 'log.csv'}; fewer --steps "
                                       f"than the recipe's, or other overrides, can be the cause.")
    print(f"[demo] FAILED: {args.pretrained or 'the trained model'} does not follow the prompt and the camera well "
          f"above chance (see the verdict above).{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
