"""The generated dataset of tests, benchmarks and the CPU demo: coloured shapes on canvases of mixed aspect ratios,
as PNG + .txt caption pairs in a folder or in WebDataset-style tar shards.

The shape is anchored in *canvas* coordinates (the axial position map of the whole canvas: the long side spans
[-1, 1], channel 0 = y, channel 1 = x): it sits at the canvas origin with a size proportional to the long side.
Training takes shifted square crops and crops the position map with them, so the model learns the shape as a
function of position, which is what makes the camera (x/y shift, zoom) move and scale it at inference.

    python -m training.toy_data /tmp/shapes -n 3000 --seed 0    # the demo's dataset (a folder)
    python -m training.toy_data /tmp/toy -n 64 --shards 4        # tar shards, one corrupt image in the first
    python -m training.toy_data /tmp/orange -n 200 --colours orange   # a colour the demo model never saw
"""

from __future__ import annotations

import argparse
import io
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours far apart in hue, on a plain light background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (235, 200, 25),
    "green": (35, 165, 60),
    "blue": (35, 70, 215),
    "purple": (140, 50, 185),
}
# Colours the demo model never sees: demo/finetune.py teaches one to it with an adapter. They stay out of COLOURS, which
# the demo's dataset draws from, so that dataset (and the shipped checkpoint trained on it) is unchanged.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (240, 130, 20),    # between red and yellow in hue: drawing a known colour instead is read as a miss
}
ALL_COLOURS = {**COLOURS, **NEW_COLOURS}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (238, 238, 232)
VIGNETTE = 0.0                 # optional: grey level lost at distance 1 from the canvas origin (0 = plain)
# (width, height) of the canvases at the training short side (32 px), with their sampling weights. None is
# square: every square crop then shows the shape at an offset only the position map tells, so the model has to
# place it by position (a square canvas would always show it centred, a shortcut that ignores the camera).
CANVASES: tuple[tuple[tuple[int, int], float], ...] = (
    ((40, 32), 1.0), ((32, 40), 1.0),
    ((48, 32), 1.0), ((32, 48), 1.0),
    ((64, 32), 1.0), ((32, 64), 1.0),
)
SUPERSAMPLE = 4
SHAPE_SIZE = (0.42, 0.50)      # half-size range of the drawn shapes, in units where the canvas's long side spans 2


def caption_for(colour: str, shape: str) -> str:
    """'a red circle', 'an orange square' (always three Qwen3 tokens for these words)."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def prompts(colours: Iterable[str] = tuple(COLOURS)) -> list[str]:
    """Every colour × shape caption, colour-major (by default the demo's colours)."""
    return [caption_for(c, s) for c in colours for s in SHAPES]


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """(colour, shape) named in a caption such as 'a red circle' (None where absent)."""
    words = text.lower().replace(",", " ").split()
    colour = next((w for w in words if w in ALL_COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float,
               fill: tuple[int, int, int]) -> None:
    """A shape of half-size `half` pixels centred at (cx, cy) pixels (the triangle's box centre)."""
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        r = half * 0.886  # same area as the circle, so size is not a cue for the shape
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        r = half * 1.2
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def background(w: int, h: int, vignette: float = VIGNETTE) -> Image.Image:
    """Plain light grey; with vignette > 0, darker with the squared distance from the canvas origin (grey, so
    demo.measure never mistakes it for the shape). The demo uses the plain one: the vignette makes the camera
    visible in the background too, but a small model paints colour where the camera looks past |p| = 1."""
    long_side = max(w, h)
    y = (np.arange(h) + 0.5 - h / 2)[:, None] * (2 / long_side)
    x = (np.arange(w) + 0.5 - w / 2)[None, :] * (2 / long_side)
    drop = vignette * (x ** 2 + y ** 2)
    rgb = np.clip(np.array(BACKGROUND, dtype=np.float32)[None, None] - drop[..., None], 0, 255)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def render(colour: str, shape: str, size: tuple[int, int], *, centre: tuple[float, float] = (0.0, 0.0),
           half_size: float = 0.34, vignette: float = VIGNETTE) -> Image.Image:
    """One canvas of `size` (w, h) px with the shape at canvas coordinates `centre` = (x, y) and half-size
    `half_size`, both in units where the long side spans [-1, 1] (so the shape scales with the long side)."""
    w, h = size
    s = SUPERSAMPLE
    img = background(w * s, h * s, vignette)
    unit = max(w, h) * s / 2  # pixels per canvas unit
    cx, cy = w * s / 2 + centre[0] * unit, h * s / 2 + centre[1] * unit
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, half_size * unit, ALL_COLOURS[colour])
    return img.resize((w, h), Image.BOX)


def sample(rng: random.Random, *, vignette: float = VIGNETTE,
           canvases: tuple[tuple[tuple[int, int], float], ...] = CANVASES,
           colours: tuple[str, ...] = tuple(COLOURS)) -> tuple[Image.Image, str]:
    """A random (image, caption) pair, its colour one of `colours` (default: the demo's COLOURS)."""
    colour, shape = rng.choice(colours), rng.choice(SHAPES)
    sizes, weights = zip(*canvases)
    size = rng.choices(sizes, weights)[0]
    jitter = (rng.gauss(0, 0.03), rng.gauss(0, 0.03))
    # Large shapes (14-16 px across at 32 px): circle and square differ in more pixels, so a tiny model tells them
    # apart in 600 steps (29/30) where shapes of 0.30-0.38 reached 23/30 in 1,200 (demo/README.md).
    img = render(colour, shape, size, centre=jitter, half_size=rng.uniform(SHAPE_SIZE[0], SHAPE_SIZE[1]),
                 vignette=vignette)
    return img, caption_for(colour, shape)


def toy_samples(n: int, seed: int = 0, **kw) -> Iterator[tuple[str, Image.Image, str]]:
    """(stem, image, caption) for n random samples, deterministic from the seed; keyword arguments go to
    `sample` (vignette, canvases, colours)."""
    rng = random.Random(seed)
    for i in range(n):
        img, caption = sample(rng, **kw)
        yield f"{i:05d}", img, caption


def make_dataset(root: str | Path, n: int = 3000, seed: int = 0, progress: Callable[[Iterable], Iterable] = iter,
                 **kw) -> Path:
    """Write n PNG + same-stem .txt pairs to root (deterministic from the seed; existing files are replaced).
    `progress` wraps the sample iterator (e.g. a tqdm bar); other keyword arguments go to `sample`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stem, img, caption in progress(toy_samples(n, seed, **kw)):
        img.save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return root


# ---------------------------------------------------------------------------------------------------
# Test fixtures: the same samples with unreadable files mixed in
# ---------------------------------------------------------------------------------------------------

CORRUPT_PNG = b"\x89PNG\r\n\x1a\n truncated"


def make_toy_folder(root: str | Path, n: int = 32, seed: int = 0, corrupt: int = 1) -> Path:
    """`make_dataset` plus `corrupt` files with an image extension that are not images (sorted after the rest)."""
    root = make_dataset(root, n, seed)
    for k in range(corrupt):
        (root / f"corrupt_{k}.png").write_bytes(CORRUPT_PNG)
        (root / f"corrupt_{k}.txt").write_text("a red square")
    return root


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_toy_shards(root: str | Path, shards: int = 4, per_shard: int = 8, seed: int = 0,
                    corrupt: int = 1) -> list[Path]:
    """WebDataset-style tars of <key>.png + <key>.txt; the first shard also holds `corrupt` bad images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    samples = [(stem, _png(img), caption) for stem, img, caption in toy_samples(shards * per_shard, seed)]
    paths = []
    for s in range(shards):
        chunk = samples[s * per_shard:(s + 1) * per_shard]
        if s == 0:
            chunk = [(f"bad{k}", b"not an image", "a red square") for k in range(corrupt)] + chunk
        paths.append(root / f"shard-{s:04d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for stem, data, caption in chunk:
                for ext, payload in (("png", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{stem}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("-n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=0, help="write this many tar shards instead of a folder")
    p.add_argument("--colours", default=",".join(COLOURS),
                   help=f"comma-separated colours to draw from, of {', '.join(ALL_COLOURS)} (default: the demo's)")
    a = p.parse_args()
    colours = tuple(c.strip() for c in a.colours.split(",") if c.strip())
    unknown = sorted(set(colours) - set(ALL_COLOURS))
    if unknown or not colours:
        p.error(f"--colours {a.colours!r}: choose from {', '.join(ALL_COLOURS)}")
    if a.shards and colours != tuple(COLOURS):
        p.error("--colours writes an image folder; leave out --shards")
    if a.shards:
        print(make_toy_shards(a.root, a.shards, max(1, a.n // a.shards), a.seed))
    else:
        print(make_dataset(a.root, a.n, a.seed, colours=colours))
