"""Command-line generator: `python -m hdm_core.generate --checkpoint hdm.safetensors --prompt "..."`.

Writes PNG files whose metadata holds the generation parameters ("parameters" text and "hdm" JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import load_components
from .pipeline import GenerationParams, generate, to_pil
from .sampling import SAMPLERS, SamplingCancelled
from .weights import DTYPES


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hdm_core.generate", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model files (a single file, or split parts that override it)")
    src.add_argument("--checkpoint", help="single-file HDM checkpoint (unet.model.*, te.*, vae.*)")
    src.add_argument("--diffusion-model", help="XUT weights only")
    src.add_argument("--text-encoder", help="Qwen3-0.6B safetensors")
    src.add_argument("--vae", help="EQ-SDXL-VAE safetensors (diffusers names)")
    src.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt files (they can run code)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--steps", type=int, default=32)
    g.add_argument("--cfg", type=float, default=3.0)
    g.add_argument("--sampler", choices=sorted(SAMPLERS), default="euler")
    g.add_argument("--shift", type=float, default=1.0, help="schedule shift (1 = official uniform schedule)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--x-shift", type=float, default=0.0, help="camera: positive moves right")
    g.add_argument("--y-shift", type=float, default=0.0, help="camera: positive moves down")
    g.add_argument("--zoom", type=float, default=1.0, help="camera: > 1 zooms in")
    g.add_argument("--tread-gamma-cond", type=float, default=0.0, help="TREAD rate of the cond pass (0 = off)")
    g.add_argument("--tread-gamma-uncond", type=float, default=0.0, help="TREAD rate of the uncond pass")
    g.add_argument("--init-image", help="img2img source image")
    g.add_argument("--strength", type=float, default=1.0, help="img2img denoise strength")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=default_device())
    r.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    r.add_argument("--compile", action="store_true", help="torch.compile the diffusion model")
    r.add_argument("--out", default="outputs", help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if args.device == "cpu" else torch.float16)
    comps = load_components(args.checkpoint, diffusion_model=args.diffusion_model, text_encoder=args.text_encoder,
                            vae=args.vae, dtype=dtype, device=args.device, allow_pickle=args.allow_pickle)
    if args.compile:
        comps.model = torch.compile(comps.model)
    params = GenerationParams(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        steps=args.steps, cfg=args.cfg, sampler=args.sampler, shift=args.shift, seed=args.seed,
        batch_size=args.batch_size, x_shift=args.x_shift, y_shift=args.y_shift, zoom=args.zoom,
        tread_gamma_cond=args.tread_gamma_cond, tread_gamma_uncond=args.tread_gamma_uncond,
        strength=args.strength)
    init = None
    if args.init_image:
        import numpy as np
        from PIL import Image

        img = Image.open(args.init_image).convert("RGB").resize((args.width, args.height), Image.LANCZOS)
        init = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 255

    start = time.perf_counter()
    with tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr) as bar:
        try:
            images = generate(comps, params, init_image=init, callback=lambda _: bar.update())
        except (KeyboardInterrupt, SamplingCancelled):
            bar.write("cancelled; nothing written", file=sys.stderr)
            return 130
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    save_pngs(to_pil(images), params, Path(args.out))
    return 0


def save_pngs(images: list, params: GenerationParams, out: Path) -> list[Path]:
    """Save with the parameters in the PNG text chunks; never overwrite an existing file."""
    from PIL.PngImagePlugin import PngInfo

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        meta = PngInfo()
        info = params.to_dict() | {"seed": params.seed + i, "batch_index": i}
        meta.add_text("parameters", f"{params.prompt}\nNegative prompt: {params.negative_prompt}\n"
                      f"Steps: {params.steps}, Sampler: {params.sampler}, CFG scale: {params.cfg}, "
                      f"Seed: {params.seed + i}, Size: {image.width}x{image.height}")
        meta.add_text("hdm", json.dumps(info))
        n = 0
        while (path := out / f"hdm_{params.seed + i:010d}_{n:03d}.png").exists():
            n += 1
        image.save(path, pnginfo=meta)
        paths.append(path)
        print(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
