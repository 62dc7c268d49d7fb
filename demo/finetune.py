"""Teach the demo model a colour it never saw: a LoRA on the shipped demo checkpoint, trained by the bundled launcher
on generated shapes, half of them in orange (training.toy_data.NEW_COLOURS), and measured before and after with
demo/measure.py, which reads each image's colour against the demo's five colours plus orange.

    python -m demo.finetune                     # about 1 min on 2 cores: dataset, 60 LoRA steps, figures, picture
    python -m demo.finetune --steps 150 finetune.dim=4      # more steps; KEY=VALUE overrides go to the launcher

Asked for "an orange circle", the demo model draws a purple one: the word is new to it (its frozen text encoder still
gives it its own embedding). After the fine-tune it draws orange, and still draws the five colours it knew.
Writes demo_out/finetune/hdm-demo-orange.safetensors (ComfyUI's LoRA keys: LoraLoaderModelOnly on the demo
checkpoint, or hdm_core.adapters.apply_adapters), demo_out/finetune/before_after.png and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hdm_core.adapters import adapters_applied
from hdm_core.canvas import IDENTITY
from hdm_core.checkpoint import load_components
from hdm_core.pipeline import image_grid, to_pil
from training.runtime import set_cpu_threads
from training.toy_data import ALL_COLOURS, COLOURS, make_dataset, parse_caption, prompts

from .measure import binomial_tail, chance_level, measure
from .run import PRETRAINED, SHEET_GREY, generate_batch, positive_int, progress, repo_relative, train, with_legend

NEW_COLOUR = "orange"
NAME = "hdm-demo-orange"
# Half the images in the new colour, half in the demo's five: the adapter learns orange without forgetting them
# (trained on orange alone, an adapter repaints the known colours: docs/training.md, "When a regularisation set
# is needed").
COLOURS_SEEN = (NEW_COLOUR,) * len(COLOURS) + tuple(COLOURS)
IMAGES, DATA_SEED = 400, 1          # another seed than the demo's dataset (0)
STEPS = 60                          # 30 steps already drew orange in 12 of 12; twice that for a margin
ADAPTER = ["finetune.method=lora", "finetune.dim=8", "finetune.alpha=8", "train.batch_size=16",
           "optim.warmup_steps=10"]
NEW_SEEDS, OLD_SEEDS = (0, 1, 2, 3), (0, 1)   # 3 shapes x 4 seeds in orange; the 15 old prompts x 2 seeds
SAMPLE = dict(steps=12, cfg=3.0, sampler="euler")
PALETTE = ALL_COLOURS                # colour read among 6: guessing is right 1 time in 6

# The verdict (binomial tails of a model that picks one of the six colours at random, chance 1/6):
THRESHOLDS = {
    "new_before_max": 2,         # of 12: at most what chance gives on average (the demo model draws purple: 0)
    "new_after_min": 9,          # of 12: P(chance reaches it) = 1.4e-5
    "old_colour_after_min": 26,  # of 30 (the demo model: 30): at most 4 of the known colours lost
    "old_shape_after_min": 22,   # of 30 (the demo model: 30 with these 12 sampling steps)
}


# ---------------------------------------------------------------------------------------------------
# Data and training
# ---------------------------------------------------------------------------------------------------

def write_dataset(root: Path, n: int = IMAGES, seed: int = DATA_SEED) -> Path:
    """toy_data's shapes in COLOURS_SEEN (half orange); an earlier run's files go."""
    shutil.rmtree(root, ignore_errors=True)
    return make_dataset(root, n, seed, colours=COLOURS_SEEN,
                        progress=lambda samples: progress(samples, "dataset", total=n))


def finetune(data: Path, runs: Path, steps: int = STEPS, base: Path = PRETRAINED, extra: Iterable[str] = (),
             quiet: bool = False) -> Path:
    """The bundled launcher on the demo recipe with model.init_from=base and a LoRA → path of the exported
    adapter (its progress bar shows here unless `quiet`)."""
    return train(data, runs, steps, extra=[f'model.init_from="{repo_relative(base)}"', *ADAPTER, *extra],
                 quiet=quiet, name=NAME)


# ---------------------------------------------------------------------------------------------------
# Before and after
# ---------------------------------------------------------------------------------------------------

def follow(comps: Any, prompt_list: list[str], seeds: Iterable[int], desc: str) -> dict[str, Any]:
    """Every prompt with every seed: how often demo.measure reads the prompt's colour (among PALETTE) and shape."""
    rows = []
    cases = [(p, s, IDENTITY) for s in seeds for p in prompt_list]
    for (p, seed, _), img in zip(cases, generate_batch(comps, cases, desc=desc, **SAMPLE)):
        m = measure(img, PALETTE)
        rows.append({"prompt": p, "seed": seed, "image": img, "colour": m.colour, "shape": m.shape})
    want = [parse_caption(r["prompt"]) for r in rows]
    return {"rows": rows, "n": len(rows),
            "colour_hits": sum(r["colour"] == c for r, (c, _) in zip(rows, want)),
            "shape_hits": sum(r["shape"] == s for r, (_, s) in zip(rows, want)),
            "colours_read": sorted({r["colour"] or "-" for r in rows})}


def before_after(comps: Any, adapter: Path, strength: float = 1.0) -> dict[str, dict[str, Any]]:
    """The new colour's prompts and the demo's old ones, on the base model and with the adapter merged in (the
    weights are restored afterwards)."""
    new, old = prompts((NEW_COLOUR,)), prompts()
    out = {"before": {"new": follow(comps, new, NEW_SEEDS, "before: new"),
                      "old": follow(comps, old, OLD_SEEDS, "before: old")}}
    with adapters_applied(comps.model, [(adapter, strength)], comps.text_encoder):
        out["after"] = {"new": follow(comps, new, NEW_SEEDS, "after: new"),
                        "old": follow(comps, old, OLD_SEEDS, "after: old")}
    return out


def verdict(fig: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """(passed, report): the new colour from at most chance to far above it, the old ones kept."""
    t, chance = THRESHOLDS, chance_level(PALETTE)["colour"]
    nb, na = fig["before"]["new"], fig["after"]["new"]
    ob, oa = fig["before"]["old"], fig["after"]["old"]
    checks = [
        (nb["colour_hits"] <= t["new_before_max"],
         f"{NEW_COLOUR} before {nb['colour_hits']}/{nb['n']} (read: {', '.join(nb['colours_read'])}; chance "
         f"{chance:.0%}, need <= {t['new_before_max']})"),
        (na["colour_hits"] >= t["new_after_min"],
         f"{NEW_COLOUR} after {na['colour_hits']}/{na['n']} (P(chance >= this) = "
         f"{binomial_tail(na['n'], na['colour_hits'], chance):.0e}, need >= {t['new_after_min']})"),
        (oa["colour_hits"] >= t["old_colour_after_min"],
         f"old colours {ob['colour_hits']} -> {oa['colour_hits']}/{oa['n']} (need >= {t['old_colour_after_min']})"),
        (oa["shape_hits"] >= t["old_shape_after_min"],
         f"old shapes {ob['shape_hits']} -> {oa['shape_hits']}/{oa['n']} (need >= {t['old_shape_after_min']})"),
    ]
    report = f"{NEW_COLOUR} shapes {nb['shape_hits']} -> {na['shape_hits']}/{na['n']}"
    passed = all(ok for ok, _ in checks)
    return passed, ("PASS: " if passed else "FAIL: ") + "; ".join(text for _, text in checks) + "; " + report


def write_picture(fig: dict[str, dict[str, Any]], path: Path, scale: int = 4) -> None:
    """Row 1: the orange prompts on the demo model; row 2: the same noise with the adapter."""
    tiles = [to_pil(r["image"][None])[0] for when in ("before", "after") for r in fig[when]["new"]["rows"]]
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    n = len(tiles) // 2
    legend = [f"Top: the demo model asked for \"{NEW_COLOUR} circle / square / triangle\" (seeds "
              f"{', '.join(map(str, NEW_SEEDS))}). Bottom: the same starting noise with the {NAME} LoRA.",
              f"{NEW_COLOUR} read in {fig['before']['new']['colour_hits']}/{n} before and "
              f"{fig['after']['new']['colour_hits']}/{n} after (demo/measure.py, 6 colours)."]
    with_legend(image_grid(tiles, n, pad=4, background=SHEET_GREY), legend).save(path)


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Teach the demo model the colour {NEW_COLOUR} with a LoRA (CPU, ~1 min).")
    p.add_argument("--out", type=Path, default=Path("demo_out") / "finetune", help="output folder")
    p.add_argument("--base", type=Path, default=PRETRAINED, help="the model to fine-tune (default: the shipped one)")
    p.add_argument("--steps", type=positive_int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    p.add_argument("--images", type=positive_int, default=IMAGES,
                   help=f"size of the generated dataset (default {IMAGES})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides passed to the launcher")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = set_cpu_threads()
    t0 = time.perf_counter()
    data = write_dataset(out / "data", args.images)
    adapter = out / f"{NAME}.safetensors"
    shutil.copyfile(finetune(data, out / "runs", args.steps, args.base, args.overrides), adapter)
    train_s = time.perf_counter() - t0
    fig = before_after(load_components(args.base, dtype=torch.float32), adapter)
    write_picture(fig, out / "before_after.png")
    passed, line = verdict(fig)
    strip = {when: {k: {n: v for n, v in f.items() if n != "rows"} for k, f in part.items()}
             for when, part in fig.items()}
    (out / "metrics.json").write_text(json.dumps(
        {"passed": passed, "verdict": line, "thresholds": THRESHOLDS, "figures": strip, "steps": args.steps,
         "overrides": ADAPTER + args.overrides, "sampling": SAMPLE, "cpu_threads": threads,
         "timings": {"dataset_and_training_s": train_s, "total_s": time.perf_counter() - t0}}, indent=2))
    print(f"[finetune] wrote {adapter}, {out / 'before_after.png'}, {out / 'metrics.json'}")
    print(f"[finetune] verdict: {line}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
