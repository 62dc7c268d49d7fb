"""A small generated dataset (coloured shapes with tag captions) for tests and the CPU demo.

    python -m training.toy_data /tmp/toy            # a folder of PNG + .txt pairs
    python -m training.toy_data /tmp/toy --shards 4 # the same as tar shards
"""

from __future__ import annotations

import argparse
import io
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle", "stripes")
SIZES = ((48, 32), (32, 48), (40, 40), (64, 32), (32, 64), (56, 40))


def toy_image(colour: str, shape: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, (245, 245, 245))
    draw, c = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "square":
        draw.rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=c)
    elif shape == "circle":
        draw.ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=c)
    else:
        for x in range(0, w, 8):
            draw.rectangle((x, 0, x + 3, h), fill=c)
    return img


def toy_samples(n: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    """(stem, png bytes, caption) triples; captions are kohya-style comma-separated tags."""
    rng, out = random.Random(seed), []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        buf = io.BytesIO()
        toy_image(colour, shape, rng.choice(SIZES)).save(buf, format="PNG")
        out.append((f"{i:05d}", buf.getvalue(), f"{colour}, {shape}, simple background"))
    return out


def make_toy_folder(root: str | Path, n: int = 32, seed: int = 0, corrupt: int = 1) -> Path:
    """PNG + .txt pairs, plus `corrupt` files with an image extension that are not images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stem, data, caption in toy_samples(n, seed):
        (root / f"{stem}.png").write_bytes(data)
        (root / f"{stem}.txt").write_text(caption)
    for k in range(corrupt):
        (root / f"corrupt_{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        (root / f"corrupt_{k}.txt").write_text("red, square")
    return root


def make_toy_shards(root: str | Path, shards: int = 4, per_shard: int = 8, seed: int = 0,
                    corrupt: int = 1) -> list[Path]:
    """WebDataset-style tars of <key>.png + <key>.txt; the first shard also holds `corrupt` bad images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    samples, paths = toy_samples(shards * per_shard, seed), []
    for s in range(shards):
        path = root / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            chunk = samples[s * per_shard:(s + 1) * per_shard]
            if s == 0:
                chunk = [(f"bad{k}", b"not an image", "red") for k in range(corrupt)] + chunk
            for stem, data, caption in chunk:
                for ext, payload in (("png", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{stem}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--shards", type=int, default=0, help="write this many tar shards instead of a folder")
    a = p.parse_args()
    if a.shards:
        print(make_toy_shards(a.root, a.shards, max(1, a.n // a.shards)))
    else:
        print(make_toy_folder(a.root, a.n))
