"""Optional cache of VAE latents (and text embeddings) for an image folder, so training skips the VAE encoder.

    python -m training.cache --config training/recipes/stage1_256.toml data.cache=/data/cache256
    torchrun --standalone --nproc_per_node=4 -m training.cache --config … data.cache=/data/cache256

For every image it stores the VAE posterior (mean, std) of the *whole* image resized so its short side is
data.resolution (both sides rounded to the VAE × patch unit), so the shifted square crop still happens at
training time, in latent space (8-px offset granularity), and a fresh posterior sample is drawn every step.
The text embedding of the caption is stored too, and used only when the recipe does not augment captions
(tag/group dropout 0, no shuffle, no caption dropout); otherwise captions are encoded online.
The trainer reads the cache through `CachedSamples`, the `load_sample` of its FolderDataset.
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hdm_core.cli import ArgumentParser, run_tool
from hdm_core.text_encoder import TextEncoder
from hdm_core.weights import atomic_write

from .captions import CaptionRules, process_caption
from .checkpointing import resolve_init_from
from .data import Sample, SampleSpec, crop_position_map, list_images, open_image
from .encoders import Vae, build_encoder
from .recipe import Recipe, load_recipe


def cache_file(cache: Path, relative: Path) -> Path:
    return Path(cache) / relative.with_suffix(".safetensors")


@dataclass(frozen=True)
class CachedSamples:
    """A FolderDataset `load_sample` that reads the cache entry of an image under `root` instead of the image."""

    cache: Path
    root: Path

    def __call__(self, path: Path, caption: str, size: tuple[int, int], spec: SampleSpec,
                 rng: random.Random) -> Sample:
        """A random latent-space crop of `size` pixels with its position map (and text embedding when usable)."""
        file = cache_file(self.cache, Path(path).relative_to(self.root))
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the cache; rerun python -m training.cache")
        t = load_file(str(file))
        f = spec.factor
        _, lh, lw = t["mean"].shape
        ch, cw = size[0] // f, size[1] // f
        if ch > lh or cw > lw:
            raise ValueError(f"cached latent {lh}x{lw} is smaller than the {size} crop; rebuild the cache at "
                             f"data.resolution {spec.resolution}")
        top, left = rng.randint(0, lh - ch), rng.randint(0, lw - cw)
        r = spec.rules
        augmented = r.tag_dropout or r.group_dropout or r.shuffle or r.caption_dropout
        return Sample(pos=crop_position_map(lh * f, lw * f, top * f, left * f, size[0], size[1], f),
                      aspect=math.log(lw / lh),
                      caption=process_caption(caption, r, rng),
                      latent_mean=t["mean"][:, top:top + ch, left:left + cw].float(),
                      latent_std=t["std"][:, top:top + ch, left:left + cw].float(),
                      ctx=t["ctx"].float() if "ctx" in t and not augmented else None)


@torch.no_grad()
def encode_posterior(vae: Vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the raw VAE posterior for images in [-1, 1]; pixel space: (image, 0)."""
    if not hasattr(vae, "vae"):
        return pixels, torch.zeros_like(pixels)
    dist = vae.vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def cache_image(image_path: Path, out: Path, vae: Vae, text_encoder: TextEncoder, recipe: Recipe,
                device: torch.device) -> bool:
    """Write one image's cache entry (atomically); False when the image is unreadable."""
    try:
        img = open_image(image_path)  # RGB, upright; over MAX_IMAGE_PIXELS is refused unread
    except Exception as err:  # noqa: BLE001
        print(f"skipping unreadable image {image_path} ({err})")
        return False
    unit = vae.downscale_factor * 2
    scale = recipe.data.resolution / min(img.size)
    w, h = (max(unit, round(s * scale / unit) * unit) for s in img.size)
    img = img.resize((w, h), resample=3)  # bicubic
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    mean, std = encode_posterior(vae, pixels.permute(2, 0, 1)[None].to(device).float() / 127.5 - 1)
    txt = image_path.with_suffix(".txt")
    caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""
    c = recipe.data.captions
    plain = CaptionRules(c.keep_separator, c.group_separator, c.tag_separator)  # separators only, no augmentation
    caption = process_caption(caption, plain, random.Random(0))
    ctx = text_encoder.encode_padded([caption], max_length=recipe.model.max_length)[0]
    tensors = {k: v.half().cpu().contiguous() for k, v in (("mean", mean[0]), ("std", std[0]), ("ctx", ctx))}
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp)))
    return True


def cache_folder(config: str, device_name: str, overrides: list[str]) -> None:
    """Encode every image of the recipe's data.path (this rank's share) into data.cache, skipping those done."""
    recipe = load_recipe(config, overrides)
    if not recipe.data.cache:
        raise ValueError("set data.cache=<folder> (on the command line or in the recipe)")
    if recipe.data.bucketing:
        raise ValueError("the latent cache supports the square-crop stages only; turn data.bucketing off")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(device_name, int(os.environ.get("LOCAL_RANK", 0)) if device_name == "cuda" else None)
    m = recipe.model  # the base file is only needed for an encoder the recipe does not name itself
    base_file = resolve_init_from(m.init_from) if m.init_from and not (m.vae and m.text_encoder) else None
    vae = build_encoder("vae", m, base_file, device)
    te = build_encoder("text_encoder", m, base_file, device)
    root = Path(recipe.data.path)
    files = list_images(root)[rank::world]
    for i, image_path in enumerate(files):
        out = cache_file(Path(recipe.data.cache), image_path.relative_to(root))
        if not out.is_file() and cache_image(image_path, out, vae, te, recipe, device) and i % 1000 == 0:
            print(f"rank {rank}: {i}/{len(files)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m training.cache`: exit 0 when done, 2 with one `error:` line for a user error (hdm_core.cli)."""
    p = ArgumentParser(prog="python -m training.cache",
                       description="Cache VAE latents and text embeddings for an image folder.")
    p.add_argument("--config", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    return run_tool(lambda: cache_folder(args.config, args.device, args.overrides))


if __name__ == "__main__":
    sys.exit(main())
