"""Batched vs separate classifier-free guidance: one CFG step (hdm_core.pipeline.make_denoiser) run as two
forwards of batch B (the baseline, measured in the same run) or as one forward of batch 2B with the shorter
context padded and masked (`ctx_mask`). The two modes alternate so that machine load hits both alike.

CPU:  python bench/bench_cfg.py                       (xut-tiny 32² latent, xut-small 64² latent)
GPU:  python bench/bench_cfg.py --device cuda --configs xut-base --latents 128 --dtype bf16
Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hdm_core import PRESETS, XUT  # noqa: E402
from hdm_core.pipeline import make_denoiser  # noqa: E402
from hdm_core.weights import DTYPES  # noqa: E402

# (cond tokens, uncond tokens): an empty negative prompt is 1 token; equal lengths need no mask.
LENGTHS = ((64, 1), (64, 24), (64, 64))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(step_a, step_b, iters: int, device: str) -> tuple[float, float]:
    """Median seconds of two callables, run alternately after one warm-up call each."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(iters + 1):
        for fn, out in ((step_a, times[0]), (step_b, times[1])):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i:
                out.append(time.perf_counter() - start)
    return tuple(sorted(t)[len(t) // 2] for t in times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="xut-tiny,xut-small")
    p.add_argument("--latents", default="32,64", help="latent side per config (pixels = 8 × latent)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}, {args.dtype}, batch {args.batch}")
    header = f"{'config':<10} {'latent':>6} {'ctx c/u':>8} {'separate ms':>12} {'batched ms':>11} {'× separate':>11}"
    print(header)
    print("-" * len(header))
    for name, side in zip(args.configs.split(","), map(int, args.latents.split(","))):
        cfg = PRESETS[name]
        torch.manual_seed(0)
        model = XUT(cfg).to(args.device, dtype).eval()
        x = torch.randn(args.batch, cfg.input_dim, side, side, device=args.device)
        sigma = torch.full((args.batch,), 0.5, device=args.device)
        aspect = torch.zeros(args.batch, device=args.device)
        for lc, lu in LENGTHS:
            cond = torch.randn(1, lc, cfg.ctx_dim, device=args.device)
            uncond = torch.randn(1, lu, cfg.ctx_dim, device=args.device)
            steps = [make_denoiser(model, cond, uncond, 3.0, pos_map=None, aspect=aspect, batch_cfg=batched)
                     for batched in (False, True)]
            with torch.inference_mode():
                sep, bat = time_pair(*(functools.partial(s, x, sigma) for s in steps), args.iters, args.device)
            print(f"{name:<10} {side:>6} {f'{lc}/{lu}':>8} {sep * 1e3:>12.1f} {bat * 1e3:>11.1f} {sep / bat:>11.2f}",
                  flush=True)
        del model


if __name__ == "__main__":
    main()
