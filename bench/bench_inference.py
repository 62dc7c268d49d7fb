"""XUT inference benchmark: forward time and achieved TFLOP/s per configuration, resolution and mode, beside a
plain eager baseline (float32, math attention, no compile) measured in the same run.

CPU:  python bench/bench_inference.py                       (xut-tiny / xut-small at 256² and 512²)
GPU:  python bench/bench_inference.py --device cuda --configs xut-base --res 1024 --dtypes fp16,bf16 --compile \
          --sampling-steps 32                               (adds seconds per 1024² image, 32 steps with CFG)
Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hdm_core import PRESETS, XUT  # noqa: E402
from hdm_core.flops import xut_flops  # noqa: E402
from hdm_core.weights import DTYPES  # noqa: E402

TEXT_TOKENS = 64  # a typical prompt; the negative is usually shorter


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model: XUT, x: torch.Tensor, ctx: torch.Tensor, iters: int, device: str,
                 math_attention: bool) -> float:
    """Median seconds per forward after warm-up."""
    ctxmgr = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    t = torch.full((x.shape[0],), 0.5, device=device, dtype=x.dtype)
    times = []
    with torch.inference_mode(), ctxmgr:
        for i in range(iters + 2):
            sync(device)
            start = time.perf_counter()
            model(x, t, ctx)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="xut-tiny,xut-small")
    p.add_argument("--res", default="256,512", help="pixel resolutions (latent = res / 8)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sampling-steps", type=int, default=0, help="report seconds per image with CFG (2 forwards/step)")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    header = (f"{'config':<10} {'res':>5} {'tokens':>6} {'mode':<28} {'ms/fwd':>9} {'GFLOP':>8} {'TFLOP/s':>8} "
              f"{'× base':>7}")
    if args.sampling_steps:
        header += f" {'s/image':>8}"
    print(header)
    print("-" * len(header))
    for name in args.configs.split(","):
        cfg = PRESETS[name]
        for res in map(int, args.res.split(",")):
            lat = res // 8
            n = (lat // cfg.patch_size) ** 2
            flops = args.batch * xut_flops(cfg, n, TEXT_TOKENS)
            torch.manual_seed(0)
            base_model = XUT(cfg).to(args.device).eval()
            modes = [("eager fp32 math-attn (base)", torch.float32, False, True)]
            modes += [(f"eager {d} sdpa", DTYPES[d], False, False) for d in args.dtypes.split(",")]
            if args.compile:
                modes += [(f"compiled {d} sdpa", DTYPES[d], True, False) for d in args.dtypes.split(",")]
            base_time = None
            for label, dtype, compiled, math_attn in modes:
                model = XUT(cfg).to(args.device, dtype).eval()
                model.load_state_dict(base_model.state_dict())
                runner = torch.compile(model) if compiled else model
                x = torch.randn(args.batch, cfg.input_dim, lat, lat, device=args.device, dtype=dtype)
                ctx = torch.randn(args.batch, TEXT_TOKENS, cfg.ctx_dim, device=args.device, dtype=dtype)
                sec = time_forward(runner, x, ctx, args.iters, args.device, math_attn)
                base_time = base_time or sec
                row = (f"{name:<10} {res:>5} {n:>6} {label:<28} {sec * 1e3:>9.2f} {flops / 1e9:>8.1f} "
                       f"{flops / sec / 1e12:>8.3f} {base_time / sec:>7.2f}")
                if args.sampling_steps:
                    row += f" {2 * args.sampling_steps * sec:>8.2f}"
                print(row, flush=True)
                del model, runner


if __name__ == "__main__":
    main()
