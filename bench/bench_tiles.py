"""What tiled sampling (hdm_core.canvas, HDM Tiled Diffusion) costs: memory and time against one untiled forward.

    python bench/bench_tiles.py                    # both tables (~2 min on one CPU thread)
    python bench/bench_tiles.py --only memory      # the memory table only (fake tensors, ~30 s)

Memory: the peak bytes of one sampling step's model call on XUT-base (fp16 weights and activations, cond and
uncond batched: 2 samples, a 77-token prompt) at canvas sizes from 1024² to 16384² px, untiled and in 1024-px tiles
overlapping by 256 px, one tile per call. Counted by `estimate_finetune_memory.LiveBytes` under FakeTensorMode
(nothing is computed or allocated, so no GPU is needed); attention is a flash kernel on CPU and CUDA alike (no
N x N matrix), so activations grow linearly with the tokens. The table adds the weights (0.69 GB) and says whether
the step fits a 24 GB card with ~1.5 GB for the CUDA context and allocator slack. Not counted: the VAE decode
(decode large images with VAE Decode (Tiled)).

Time: one model call of XUT-base (random weights, fp32, this CPU) at 512² px untiled against 256-px tiles
overlapping by 64 (9 tiles), one tile per call and all 9 in one call; the baseline is the untiled call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_finetune_memory import LiveBytes, default_dtype  # noqa: E402

from hdm_core import XUT  # noqa: E402
from hdm_core.canvas import IDENTITY, Tiling, canvas_position_map  # noqa: E402
from hdm_core.config import PRESETS  # noqa: E402
from hdm_core.pipeline import TiledModel  # noqa: E402
from hdm_core.rope import aspect_info  # noqa: E402
from training.runtime import set_cpu_threads  # noqa: E402

GB = 1e9
CARD, RESERVE = 24.0, 1.5  # GB: the card, and what the CUDA context and the caching allocator keep for themselves
SIDES = (1024, 2048, 4096, 8192, 12288, 16384)
TOKENS = 77


def model_call(model: XUT, side: int, tiling: Tiling | None, batch: int = 2,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """One sampling step's model call on a side² px canvas (latent side/8), tiled or not."""
    lat = side // 8
    x = torch.randn(batch, 4, lat, lat, dtype=dtype)
    t, ctx = torch.full((batch,), 0.5, dtype=dtype), torch.randn(batch, TOKENS, 1024, dtype=dtype)
    pos = canvas_position_map(lat, lat)[None].to(dtype)
    aspect = torch.full((batch,), aspect_info(lat, lat), dtype=dtype)
    call = model if tiling is None else TiledModel(model, tiling, IDENTITY)  # the pipeline's tiled model
    return call(x, t, ctx, pos_map=pos, aspect=aspect)


def memory_table() -> None:
    tiling = Tiling(128, 128, 32)  # 1024-px tiles overlapping by 256 px, one per call
    with FakeTensorMode(), default_dtype(torch.float16):
        model = XUT(PRESETS["xut-base"]).eval().requires_grad_(False)
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
        print(f"XUT-base weights {weights:.2f} GB (fp16); peak of one CFG model call (2 samples), activations + "
              f"weights; fits = under {CARD - RESERVE:.1f} GB of a {CARD:.0f} GB card")
        print("| canvas | tokens | untiled | fits | 1024-px tiles | fits | tiled / untiled |")
        print("|---|---|---|---|---|---|---|")
        for side in SIDES:
            peaks = []
            for t in (None, tiling):
                with LiveBytes() as mem, torch.no_grad():
                    model_call(model, side, t)
                peaks.append(mem.peak / GB + weights)
            fit = ["yes" if p <= CARD - RESERVE else "no" for p in peaks]
            print(f"| {side}² px | {(side // 16) ** 2:,} | {peaks[0]:.1f} GB | {fit[0]} | {peaks[1]:.1f} GB | "
                  f"{fit[1]} | {peaks[1] / peaks[0]:.2f}× |", flush=True)


def time_table(repeats: int) -> None:
    torch.manual_seed(0)
    model = XUT(PRESETS["xut-base"]).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    ways = {"untiled (baseline)": None, "256-px tiles, 1 per call": Tiling(32, 32, 8),
            "256-px tiles, 9 per call": Tiling(32, 32, 8, batch=9)}
    print(f"\nXUT-base, fp32, {torch.get_num_threads()} CPU thread(s): one CFG model call (2 samples) at 512² px, "
          f"best of {repeats}")
    print("| way | tiles | ms | vs untiled |")
    print("|---|---|---|---|")
    base = None
    for name, tiling in ways.items():
        call = lambda tiling=tiling: model_call(model, 512, tiling, dtype=torch.float32)  # noqa: E731
        with torch.no_grad():
            call()  # warm-up
            best = min(_timed(call) for _ in range(repeats))
        base = base or best
        print(f"| {name} | {1 if tiling is None else 9} | {best * 1000:,.0f} | {best / base:.2f}× |", flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("memory", "time"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_cpu_threads()
    if args.only != "time":
        memory_table()
    if args.only != "memory":
        with torch.no_grad():
            time_table(args.repeats)


if __name__ == "__main__":
    main()
