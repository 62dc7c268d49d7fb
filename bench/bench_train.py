"""Training-step benchmark: samples/s, image tokens/s and model-FLOPs utilisation of the real training step
(training.loss.training_loss + backward + muP AdamW), each variant beside a plain baseline (fp32, eager, no
TREAD) measured in the same run, with ratios. A second table puts the adapter recipes (training/finetune.py:
the LoRA of finetune_lora_24gb.toml, the official LoKr of finetune_lokr_1024.toml) beside full fine-tuning of
the same model in the same run: samples/s, trainable parameters, ratios, and on CUDA the peak memory.

GPU:  python bench/bench_train.py --device cuda          (XUT-base, 256², batch 32, online Qwen3-0.6B + SDXL VAE;
                                                          adapters: XUT-base 1024², batch 4, as the 24 GB recipe)
CPU:  python bench/bench_train.py                        (xut-tiny, pixel space 32² and a tiny 8× VAE at 64²;
                                                          adapters: XUT-base's layout at 3/8 width, 256², batch 4)
      python bench/bench_train.py --only adapters        (the adapter table alone: ~3 min on one CPU thread)
Weights are random (the encoders too): speed does not depend on their values. MFU counts the XUT's training
FLOPs only (3 × forward, TREAD-aware, no recompute, no encoders) against the dense bf16 peak of the GPU, or
against a measured fp32 matmul rate on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hdm_core import PRESETS, XUT  # noqa: E402
from hdm_core.flops import xut_flops  # noqa: E402
from hdm_core.tread import keep_count  # noqa: E402
from hdm_core.weights import DTYPES  # noqa: E402
from training.data import Batch, crop_position_map  # noqa: E402
from training.encoders import build_text_encoder, build_vae  # noqa: E402
from training.finetune import AdaptedXUT, FinetuneSection, attach  # noqa: E402
from training.loss import training_loss  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.recipe import ModelSection, OptimSection, load_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"
# The CPU stand-in for XUT-base in the adapter table: its block layout (1 + 3 blocks per level, TREAD 1 / 3) at
# 3/8 of its width and half its depth, 32M parameters (XUT-base: 343M).
CPU_ADAPTER_XUT = PRESETS["xut-base"].replace(dim=384, heads=6, mlp_dim=1152, depth=2)

# Dense bf16 tensor-core peaks (FP32 accumulate), FLOP/s, matched on the device name.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
         "RTX 5090": 209.5e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
TAGS = ["1girl", "solo", "long hair", "smile", "outdoors", "sky", "cloud", "tree", "dress", "hat", "flower", "red eyes"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in PEAKS.items():
            if key in name:
                return value, f"{name}, bf16 dense peak {value / 1e12:.0f} TFLOP/s"
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    sync(device)
    rate = 5 * 2 * n**3 / (time.perf_counter() - start)
    return rate, f"{device.type}, measured fp32 matmul {rate / 1e9:.1f} GFLOP/s"


def make_batch(batch: int, res: int, factor: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    captions = [", ".join(TAGS[j % len(TAGS)] for j in range(i, i + 30)) for i in range(batch)]
    pos = crop_position_map(res, res, 0, 0, res, res, factor)
    return Batch(pixels=torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g),
                 pos=pos.expand(batch, -1, -1).contiguous(), aspect=torch.zeros(batch), captions=captions)


@dataclasses.dataclass
class Timing:
    seconds: float                       # per training step, median
    trainable: int                       # parameters the optimizer updates
    peak_gb: float | None                # CUDA max_memory_allocated since the caller's reset


def bench_variant(*args, **kwargs) -> float:
    """Seconds per training step: `train_steps(...).seconds` (what bench/gpu_check_speed.py calls)."""
    return train_steps(*args, **kwargs).seconds


def train_steps(cfg, te, vae, batch: Batch, device: torch.device, precision: str, tread: float, compile_: bool,
                cached: bool, max_length: int, steps: int, warmup: int, grad_ckpt: bool, *,
                backend: str = "inductor", finetune: FinetuneSection | None = None) -> Timing:
    """Time per training step (median of `steps` after `warmup`); `backend` is torch.compile's. With `finetune`,
    the XUT is frozen and the section's adapter trained, as training.model.build_trainee does."""
    torch.manual_seed(0)
    model = XUT(cfg, device=device)
    model.init_for_training()
    model.gradient_checkpointing = grad_ckpt
    model.train()
    trainee, trained = model, model
    if finetune is not None:
        adapters = attach(finetune, model, te)
        trainee, trained = AdaptedXUT(model, adapters), adapters
    section = ModelSection(tread_rate=tread, max_length=max_length)
    opt, sched = build_optimizer(trained, OptimSection(warmup_steps=0), 1000)  # lr 0.5, betas (0.9, 0.98), wd 0.02
    step_model = torch.compile(trainee, backend=backend) if compile_ else trainee
    autocast = lambda: torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")  # noqa: E731
    batch = batch.to(device)
    if cached:  # encoders out of the loop: what a latent + text cache would feed
        gen = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            x0 = vae.encode(batch.pixels.float() / 127.5 - 1, generator=gen).float()
            ctx = te.encode_padded(batch.captions, max_length=max_length).float()
        std = torch.zeros_like(x0)
        x0 = vae.denormalize(x0)  # training_loss normalises the cached posterior again
        batch = dataclasses.replace(batch, latent_mean=x0, latent_std=std, ctx=ctx)
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        gen = torch.Generator(device).manual_seed(i)
        loss = training_loss(step_model, batch, te, vae, section, gen, autocast, model.config.patch_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    timing = Timing(sorted(times)[len(times) // 2], sum(p.numel() for p in trained.parameters()),
                    torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None)
    del model, trainee, trained, opt, step_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timing


def run_setting(title: str, preset: str, te_spec: str, vae_spec: str, res: int, batch_size: int, max_length: int,
                variants: list[tuple[str, str, float, bool, bool]], device: torch.device, args) -> None:
    enc_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    te = build_text_encoder(te_spec, enc_dtype, device)
    vae = build_vae(vae_spec, enc_dtype, device)
    cfg = PRESETS[preset].replace(input_dim=vae.latent_channels, ctx_dim=te.hidden_size)
    batch = make_batch(batch_size, res, vae.downscale_factor)
    side = res // vae.downscale_factor // cfg.patch_size
    n = side * side
    peak, peak_text = peak_flops(device)
    print(f"\n{title}: {preset} at {res}², batch {batch_size}, {n} image + {max_length} text tokens, "
          f"TE {te_spec}, VAE {vae_spec}; {peak_text}")
    print(f"{'variant':<34} {'ms/step':>9} {'samples/s':>10} {'img tok/s':>10} {'MFU':>6} {'× base':>7}")
    base = None
    for name, precision, tread, compile_, cached in variants:
        try:
            sec = bench_variant(cfg, te, vae, batch, device, precision, tread, compile_, cached, max_length,
                                args.steps, args.warmup, args.grad_ckpt)
        except Exception as err:  # noqa: BLE001 - report and keep benchmarking the other variants
            print(f"{name:<34} failed: {type(err).__name__}: {str(err)[:80]}")
            continue
        kept = keep_count(n, tread) if tread else None
        flops = 3 * xut_flops(cfg, n, max_length, kept) * batch_size  # training FLOPs of one step
        base = base or sec
        print(f"{name:<34} {sec * 1e3:9.1f} {batch_size / sec:10.1f} {batch_size * n / sec:10.0f} "
              f"{flops / sec / peak:6.1%} {base / sec:6.2f}×")


def adapter_variants() -> list[tuple[str, FinetuneSection | None]]:
    """(name, [finetune] section or None for full fine-tuning): the shipped recipes' adapters."""
    lora = load_recipe(RECIPES / "finetune_lora_24gb.toml").finetune
    lokr = load_recipe(RECIPES / "finetune_lokr_1024.toml").finetune
    return [("full fine-tuning (base)", None),
            (f"LoRA r{lora.dim}, {'/'.join(lora.modules)} (24gb recipe)", lora),
            ("LoKr f4 full matrix + norms (lokr recipe)", lokr)]


def run_adapters(title: str, cfg, te_spec: str, vae_spec: str, res: int, batch_size: int, max_length: int,
                 precision: str, device: torch.device, args) -> None:
    """Full fine-tuning vs the recipes' adapters on one model, as the recipes train: TREAD off, gradient
    checkpointing, online encoders (fp16 on CUDA, as model.encoder_dtype)."""
    enc_dtype = torch.float16 if device.type == "cuda" else torch.float32
    te = build_text_encoder(te_spec, enc_dtype, device)
    vae = build_vae(vae_spec, enc_dtype, device)
    cfg = cfg.replace(input_dim=vae.latent_channels, ctx_dim=te.hidden_size)
    batch = make_batch(batch_size, res, vae.downscale_factor)
    n = (res // vae.downscale_factor // cfg.patch_size) ** 2
    print(f"\n{title}: XUT dim {cfg.dim}, depth {cfg.depth}, at {res}², batch {batch_size}, {n} image + {max_length} "
          f"text tokens, {precision}, gradient checkpointing, no TREAD, TE {te_spec}, VAE {vae_spec}")
    print(f"{'variant':<44} {'ms/step':>9} {'samples/s':>10} {'× base':>7} {'trainable':>11} {'% params':>9} "
          f"{'peak GB':>8}")
    base = None
    for name, ft in adapter_variants():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the encoders' weights stay counted
        try:
            r = train_steps(cfg, te, vae, batch, device, precision, 0.0, False, False, max_length, args.steps,
                            args.warmup, True, finetune=ft)
        except Exception as err:  # noqa: BLE001 - report and keep benchmarking the other variants
            print(f"{name:<44} failed: {type(err).__name__}: {str(err)[:80]}")
            continue
        base = base or r
        peak = f"{r.peak_gb:8.2f}" if r.peak_gb is not None else f"{'-':>8}"
        print(f"{name:<44} {r.seconds * 1e3:9.1f} {batch_size / r.seconds:10.2f} {base.seconds / r.seconds:6.2f}× "
              f"{r.trainable / 1e6:10.2f}M {r.trainable / base.trainable:9.2%} {peak}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=0, help="per-step batch (default 32 on GPU, 8 on CPU)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 10 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in every variant")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--only", choices=["all", "variants", "adapters"], default="all",
                   help="the precision / TREAD / compile table, the adapter table, or both")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.steps = args.steps or (10 if gpu else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    baseline = ("baseline: fp32 eager, no TREAD", "fp32", 0.0, False, False)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # an honest fp32 baseline
        variants = [baseline,
                    ("bf16, no TREAD", "bf16", 0.0, False, False),
                    ("bf16, TREAD 0.5 (recipe)", "bf16", 0.5, False, False),
                    ("bf16, TREAD 0.5, XUT only (cached)", "bf16", 0.5, False, True)]
        if not args.no_compile:
            variants += [("bf16, TREAD 0.5, compiled", "bf16", 0.5, True, False),
                         ("bf16, TREAD 0.5, compiled, cached", "bf16", 0.5, True, True)]
        if args.only != "adapters":
            run_setting("GPU", "xut-base", "random:qwen3-0.6b", "random:sdxl", 256, args.batch or 32, 256,
                        variants, device, args)
        if args.only != "variants":
            run_adapters("GPU adapters", PRESETS["xut-base"], "random:qwen3-0.6b", "random:sdxl", 1024,
                         args.batch or 4, 256, "bf16", device, args)
        return
    variants = [baseline,
                ("fp32, TREAD 0.5", "fp32", 0.5, False, False),
                ("fp32, TREAD 0.5, cached encoders", "fp32", 0.5, False, True),
                ("bf16 autocast, TREAD 0.5", "bf16", 0.5, False, False)]
    if args.only != "adapters":
        run_setting("CPU pixel space", "xut-tiny", "random:tiny", "pixel", 32, args.batch or 8, 16, variants, device,
                    args)
        run_setting("CPU tiny 8x VAE", "xut-tiny", "random:tiny", "random:tiny", 64, args.batch or 8, 16, variants,
                    device, args)
    if args.only != "variants":
        run_adapters("CPU adapters", CPU_ADAPTER_XUT, "random:tiny", "random:tiny", 256, args.batch or 4, 16, "fp32",
                     device, args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
