"""Command-line generator: `python -m hdm_core.generate --checkpoint hdm.safetensors --prompt "..."`.

Writes PNG files whose metadata holds the generation parameters, the model file and the adapters with their
strengths and sha256 hashes: the "parameters" text in A1111's style (`Model: …, Model hash: …, Lora hashes: …`,
short hashes as A1111 and Civitai read them) and the "hdm" JSON (full hashes). The hashes are computed while
sampling runs. One CPU thread unless OMP_NUM_THREADS is set (`hdm_core.cli.set_cpu_threads`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .adapters import apply_adapters
from .canvas import Camera
from .checkpoint import fingerprint, load_components
from .cli import ArgumentParser, check_adapter_files, file_record, lora_arg, run_tool
from .images import open_rgb
from .pipeline import TILE_POSITIONS, GenerationParams, generate, to_pil
from .sampling import SAMPLERS
from .weights import DTYPES, atomic_write, check_writable


def default_device() -> str:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; an option whose default is None says in its own help what None means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:
            return action.help
        if action.default == "":
            return f"{action.help} (default: empty)"
        if action.default == []:
            return f"{action.help} (default: none)"
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hdm_core.generate", description=__doc__, formatter_class=_HelpFormatter)
    src = p.add_argument_group("model files (a single file, or split parts that override it)")
    src.add_argument("--checkpoint", help="single-file HDM checkpoint (unet.model.*, te.*, vae.*); "
                                          "needed unless --diffusion-model is given")
    src.add_argument("--diffusion-model", help="XUT weights only (default: the XUT of --checkpoint)")
    src.add_argument("--text-encoder", help="Qwen3-0.6B safetensors (default: the one in --checkpoint)")
    src.add_argument("--vae", help="EQ-SDXL-VAE safetensors, diffusers names (default: the one in --checkpoint)")
    src.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt files (they can run code)")
    src.add_argument("--lora", action="append", default=[], type=lora_arg, metavar="FILE[:STRENGTH]",
                     help="merge a LoRA/LoHa/LoKr .safetensors (ComfyUI keys) at STRENGTH (default 1.0) into the "
                          "diffusion model (and its text-encoder keys into the text encoder); repeat for several")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", required=True, help="what to draw (required)")
    g.add_argument("--negative-prompt", default="", help="what to steer away from (the uncond pass of CFG)")
    g.add_argument("--width", type=int, default=1024, help="image width in px (rounded down to a multiple of 16)")
    g.add_argument("--height", type=int, default=1024, help="image height in px (rounded down to a multiple of 16)")
    g.add_argument("--steps", type=int, default=32, help="sampling steps")
    g.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = no guidance)")
    g.add_argument("--sampler", choices=sorted(SAMPLERS), default="euler", help="euler is the official sampler")
    g.add_argument("--shift", type=float, default=1.0, help="schedule shift (1 = official uniform schedule)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    g.add_argument("--batch-size", type=int, default=1, help="images generated at once")
    g.add_argument("--x-shift", type=float, default=0.0, help="camera: positive moves right")
    g.add_argument("--y-shift", type=float, default=0.0, help="camera: positive moves down")
    g.add_argument("--zoom", type=float, default=1.0, help="camera: > 1 zooms in")
    g.add_argument("--tile", type=int, default=0, metavar="PX",
                   help="render in overlapping square tiles of PX pixels (memory bounded; 0 = one pass); each tile "
                        "gets its true place on the canvas")
    g.add_argument("--tile-overlap", type=int, default=0, metavar="PX", help="pixels shared by neighbouring tiles")
    g.add_argument("--tile-positions", choices=TILE_POSITIONS, default="canvas",
                   help="canvas: each tile its slice of the canvas (one coherent picture); own: each tile a "
                        "picture of its own (what tiled upscalers do for other models)")
    g.add_argument("--tread-gamma-cond", type=float, default=0.0, help="TREAD rate of the cond pass (0 = off)")
    g.add_argument("--tread-gamma-uncond", type=float, default=0.0, help="TREAD rate of the uncond pass (0 = off)")
    g.add_argument("--init-image", help="img2img source image (default: none, text-to-image)")
    g.add_argument("--strength", type=float, default=1.0, help="img2img denoise strength (1 = ignore the image)")
    g.add_argument("--max-prompt-tokens", type=int, help="cut longer prompts to this many tokens (default: no limit; "
                                                         "HDM was trained on up to 256)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    r.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: fp16 on GPU, fp32 on CPU)")
    r.add_argument("--compile", action="store_true", help="torch.compile the diffusion model")
    r.add_argument("--out", default="outputs", help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check everything that can be checked, load, sample, write; user errors are one line and exit code 2, Ctrl-C
    exits 130 with nothing written."""
    args = parse_args(argv)
    return run_tool(lambda: run(args))


def run(args: argparse.Namespace) -> list[Path]:
    """What `main` does, with the parsed arguments → the PNGs written."""
    params, device, init = prepare(args)
    start = time.perf_counter()
    comps = load_components(args.checkpoint, diffusion_model=args.diffusion_model, text_encoder=args.text_encoder,
                            vae=args.vae, dtype=pick_dtype(args.dtype, device), device=device,
                            allow_pickle=args.allow_pickle)
    model_file = Path(args.diffusion_model or args.checkpoint)
    apply_adapters(comps.model, args.lora, text_encoder=comps.text_encoder, base=fingerprint(model_file))
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    sources = in_background(lambda: source_records(model_file, args.lora))  # sha256 of each file, while sampling
    if args.compile:
        comps.model = torch.compile(comps.model)
    images = sample(comps, params, init)
    return save_pngs(to_pil(images), params, Path(args.out), sources())


def prepare(args: argparse.Namespace) -> tuple[GenerationParams, str, torch.Tensor | None]:
    """Everything checked before a model is loaded: parameters, device, output folder, init image."""
    params = GenerationParams(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        steps=args.steps, cfg=args.cfg, sampler=args.sampler, shift=args.shift, seed=args.seed,
        batch_size=args.batch_size, camera=Camera(args.x_shift, args.y_shift, args.zoom),
        tread_gamma_cond=args.tread_gamma_cond, tread_gamma_uncond=args.tread_gamma_uncond,
        strength=args.strength, max_prompt_tokens=args.max_prompt_tokens, tile_size=args.tile,
        tile_overlap=args.tile_overlap, tile_positions=args.tile_positions).validate()
    if params.strength < 1.0 and not args.init_image:
        raise ValueError(f"--strength {params.strength} needs --init-image (img2img); without it leave strength at 1")
    check_adapter_files(path for path, _ in args.lora)
    if not args.checkpoint and not args.diffusion_model:
        raise ValueError("give --checkpoint (the single file) or --diffusion-model")
    device = check_device(args.device or default_device())
    check_writable(args.out, "choose another --out", what="the output folder ")
    init = None
    if args.init_image:
        img = open_rgb(args.init_image).resize((params.width, params.height), Image.LANCZOS)
        init = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 255
    return params, device, init


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    return DTYPES[name] if name else (torch.float32 if device == "cpu" else torch.float16)


def check_device(device: str) -> str:
    """The device name, if this machine has it; else ValueError saying which devices it has."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a device name ({err}); use cuda, mps or cpu") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(kind, False):
        have = ", ".join(k for k, ok in available.items() if ok)
        raise ValueError(f"--device {device}: this machine has no {kind} device (available: {have})")
    return device


def sample(comps: object, params: GenerationParams, init: torch.Tensor | None) -> torch.Tensor:
    start = time.perf_counter()
    with tqdm(total=params.steps, desc="sampling", unit="step", file=sys.stderr) as bar:
        images = generate(comps, params, init_image=init, callback=lambda _: bar.update())
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return images


def in_background(work: Callable[[], Any]) -> Callable[[], Any]:
    """Start `work` in a daemon thread (it never delays an exit) → a function that waits for its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    return result


def source_records(model: str | Path, loras: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """What a PNG records of its sources: {"model": {file, sha256}, "loras": [{file, sha256, strength}, …]}."""
    return {"model": file_record(model), "loras": [{**file_record(path), "strength": s} for path, s in loras]}


def parameters_text(params: GenerationParams, seed: int, width: int, height: int,
                    sources: dict[str, Any] | None = None) -> str:
    """The PNG "parameters" text: prompt, negative prompt and one line of settings (A1111-style), ending with the
    model and adapters when `sources` (`source_records`) is given: `Model hash` is the sha256's first 10 hex
    digits (A1111's AutoV2), each `Lora hashes` entry its first 12, as A1111 and Civitai read them."""
    settings = [f"Steps: {params.steps}", f"Sampler: {params.sampler}", f"CFG scale: {params.cfg}", f"Seed: {seed}",
                f"Size: {width}x{height}", f"Shift: {params.shift}", f"X shift: {params.camera.x_shift}",
                f"Y shift: {params.camera.y_shift}", f"Zoom: {params.camera.zoom}",
                f"TREAD gamma cond: {params.tread_gamma_cond}", f"TREAD gamma uncond: {params.tread_gamma_uncond}"]
    if params.tile_size:
        settings.append(f"Tiles: {params.tile_size} px, overlap {params.tile_overlap} px, {params.tile_positions} "
                        f"positions")
    if params.strength < 1:
        settings.append(f"Denoising strength: {params.strength}")
    if sources is not None:
        model, loras = sources["model"], sources["loras"]
        settings += [f"Model hash: {model['sha256'][:10]}", f"Model: {Path(model['file']).stem}"]
        if loras:
            settings.append('Lora hashes: "' + ", ".join(f"{Path(r['file']).stem}: {r['sha256'][:12]}" for r in loras)
                            + '"')
            settings.append('Lora strengths: "' + ", ".join(f"{Path(r['file']).stem}: {r['strength']:g}"
                                                            for r in loras) + '"')
    return f"{params.prompt}\nNegative prompt: {params.negative_prompt}\n" + ", ".join(settings)


def save_pngs(images: list, params: GenerationParams, out: Path, sources: dict[str, Any] | None = None) -> list[Path]:
    """Save with the parameters (and `sources`, see `source_records`) in the PNG text chunks; never overwrite an
    existing file."""
    from PIL.PngImagePlugin import PngInfo

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        meta = PngInfo()
        info = params.to_dict() | {"seed": params.seed + i, "batch_index": i} | (sources or {})
        meta.add_text("parameters", parameters_text(params, params.seed + i, image.width, image.height, sources))
        meta.add_text("hdm", json.dumps(info, allow_nan=False))
        n = 0
        while (path := out / f"hdm_{params.seed + i:010d}_{n:03d}.png").exists():
            n += 1
        atomic_write(path, lambda tmp, image=image, meta=meta: image.save(tmp, format="PNG", pnginfo=meta))
        paths.append(path)
        print(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
