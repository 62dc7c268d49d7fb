"""Train an HDM XUT with plain PyTorch DDP, one TOML recipe per stage (training/recipes/).

    python -m training.train --config training/recipes/tiny_cpu.toml data.path=/tmp/images
    torchrun --standalone --nproc_per_node=4 -m training.train --config training/recipes/stage1_256.toml --resume
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --max-restarts=3 \\
        -m training.train --config training/recipes/stage1_256.toml --resume
    # progressive: each stage starts from the previous stage's export with a fresh optimizer
    torchrun --standalone --nproc_per_node=4 -m training.train --resume \\
        --config training/recipes/stage1_256.toml --config training/recipes/stage2_512.toml \\
        --config training/recipes/stage3_768.toml --config training/recipes/stage4_1024.toml

Overrides (`optim.lr=0.1`, `data.path="/data"`) apply to every stage. `--resume` continues from the latest
checkpoint of each stage's run folder (or starts it when there is none), so it is safe in a restart loop.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from hdm_core.config import PRESETS, XUTConfig
from hdm_core.flow import interpolate, sample_t_logit_normal, velocity_target
from hdm_core.xut import XUT

from .checkpointing import export_released, latest_checkpoint, load_checkpoint, load_init_weights, save_checkpoint
from .data import CaptionRules, FolderDataset, FolderSource, SampleSpec, make_buckets
from .encoders import build_text_encoder, build_vae
from .monitor import Monitor, sample_grid
from .optim import build_optimizer, update_ema
from .recipe import Recipe, load_recipe
from .runtime import StopRequest, gather, setup_distributed, step_seed
from .shards import ShardSource, ShardStream, count_samples, expand_shards

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

def model_config(recipe: Recipe, init_config: XUTConfig | None) -> XUTConfig:
    """Preset (or the init checkpoint's config) + recipe overrides, with the recipe's TREAD rate recorded."""
    m = recipe.model
    if m.preset:
        if m.preset not in PRESETS:
            raise ValueError(f"model.preset {m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        base = PRESETS[m.preset].to_dict()
    elif init_config is not None:
        base = init_config.to_dict()
    else:
        raise ValueError("model.preset is empty and there is no model.init_from to take the config from")
    over = dict(m.config)
    over["tread_config"] = {**base["tread_config"], **over.get("tread_config", {}), "dropout_ratio": m.tread_rate}
    return XUTConfig.from_dict({**base, **over})


def make_source(recipe: Recipe, spec: SampleSpec, rank: int, world: int, state: dict | None) -> tuple[Any, int]:
    """The rank's endless batch iterator (folder or tar shards) and its micro-batches per epoch."""
    d, batch = recipe.data, recipe.train.batch_size
    if not d.path:
        raise ValueError("data.path is empty; pass data.path=/path/to/images (a folder with .txt captions) "
                         "or data.path='/path/to/shards/*.tar'")
    buckets = make_buckets(d.resolution, d.bucket_step, d.bucket_max_ratio) if d.bucketing else None
    if d.path.endswith(".tar") or any(c in d.path for c in "*{,"):
        shards = expand_shards(d.path)
        slots = max(1, min(d.workers, len(shards) // world))
        stream = ShardStream(shards, spec, recipe.train.seed, batch, rank, world, slots, buckets,
                             d.shuffle_buffer, state)
        num_samples = d.num_samples or count_samples(shards)
        return ShardSource(stream, slots if d.workers > 0 else 0), max(1, num_samples // (batch * world))
    if state is not None and "epoch" not in state:
        raise ValueError("the checkpoint's data position is for tar shards but data.path is a folder")
    source = FolderSource(FolderDataset(d.path, spec, recipe.train.seed, d.cache), batch, rank, world,
                          d.workers, buckets, state)
    return source, source.batches_per_epoch


def training_loss(model: torch.nn.Module, batch: dict, text_encoder: Any, vae: Any, recipe: Recipe,
                  gen: torch.Generator, device: torch.device, autocast: Any) -> torch.Tensor:
    """Flow matching: t ~ logit-normal(0, 1), x_t = t·ε + (1 − t)·x0, MSE of v against ε − x0."""
    with torch.no_grad():
        if "latent_mean" in batch:  # cached posterior: draw the sample here, as the online path does
            mean, std = batch["latent_mean"].to(device).float(), batch["latent_std"].to(device).float()
            x0 = vae.normalize(mean + std * torch.randn(mean.shape, generator=gen, device=device))
        else:
            pixels = batch["pixels"].to(device).float() / 127.5 - 1                   # (B, 3, H, W) in [-1, 1]
            x0 = vae.encode(pixels, generator=gen).float()                             # (B, C, H/f, W/f)
        if "ctx" in batch:
            ctx = batch["ctx"].to(device).float()
        else:
            ctx = text_encoder.encode_padded(batch["captions"], max_length=recipe.model.max_length).float()
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = sample_t_logit_normal(x0.shape[0], generator=gen, device=device)
        x_t = interpolate(x0, noise, t)
    with autocast():
        v = model(x_t, t, ctx, pos_map=batch["pos"].to(device), aspect=batch["aspect"].to(device),
                  tread_rate=recipe.model.tread_rate or None, generator=gen)
    return F.mse_loss(v.float(), velocity_target(x0, noise))


def batches(source: Any) -> Iterator[dict]:
    while True:
        yield from source


# ---------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------

def run_stage(recipe: Recipe, args: argparse.Namespace, rank: int, world: int,
              device: torch.device) -> tuple[Path, bool]:
    """Train one recipe to the end or to a stop request → (path of the released-layout export, finished)."""
    t_cfg, run_dir, is_main = recipe.train, recipe.run_dir, rank == 0
    export_path = run_dir / "export" / f"{recipe.name}.safetensors"
    if args.resume and (run_dir / "done.json").is_file() and export_path.is_file():
        if is_main:
            print(f"[{recipe.name}] already finished ({export_path}); skipping")
        return export_path, True
    resume_path = None
    if args.resume:
        resume_path = latest_checkpoint(run_dir) if args.resume == "auto" else Path(args.resume)
    elif latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints; pass --resume to continue it, or change "
                              f"name / run.out_dir for a new run")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))

    # 1. Seeds. A different seed per rank (DiT); per-step noise comes from step_seed, not from a stream.
    torch.manual_seed(t_cfg.seed * world + rank)
    random.seed(t_cfg.seed * world + rank)

    # 2. Frozen encoders.
    enc_dtype = DTYPES[recipe.model.encoder_dtype] if device.type == "cuda" else torch.float32
    text_encoder = build_text_encoder(recipe.model.text_encoder, enc_dtype, device)
    vae = build_vae(recipe.model.vae, enc_dtype, device)

    # 3. Model: from scratch (official init) or from a checkpoint; EMA; gradient checkpointing; DDP; compile.
    init_sd, init_cfg = load_init_weights(recipe.model.init_from) if recipe.model.init_from else (None, None)
    cfg = model_config(recipe, init_cfg)
    if text_encoder.hidden_size != cfg.ctx_dim or vae.latent_channels != cfg.input_dim:
        raise ValueError(f"encoders do not fit the model: text hidden {text_encoder.hidden_size} vs ctx_dim "
                         f"{cfg.ctx_dim}, VAE channels {vae.latent_channels} vs input_dim {cfg.input_dim}; "
                         f"fix model.text_encoder / model.vae or model.config")
    unit = vae.downscale_factor * cfg.patch_size
    for name in ("resolution", "bucket_step"):
        if getattr(recipe.data, name) % unit and (name == "resolution" or recipe.data.bucketing):
            raise ValueError(f"data.{name} {getattr(recipe.data, name)} is not a multiple of {unit} px (VAE "
                             f"factor {vae.downscale_factor} × patch {cfg.patch_size}); use a multiple of {unit}")
    raw_model = XUT(cfg, device=device)
    if init_sd is None:
        raw_model.init_for_training()
    else:
        try:
            raw_model.load_state_dict(init_sd)
        except RuntimeError as err:
            raise ValueError(f"model.init_from {recipe.model.init_from} does not match the recipe's model "
                             f"{cfg.to_dict()}: {str(err)[:300]}") from err
    raw_model.gradient_checkpointing = recipe.model.gradient_checkpointing
    raw_model.train()
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval() if t_cfg.ema_decay > 0 else None

    # 4. Data.
    state = load_checkpoint(resume_path) if resume_path is not None else None
    data_state = None
    if state is not None:
        if state["world_size"] == world:
            data_state = state["data"][rank]
        elif "epoch" in state["data"][0]:  # folder: the global batch list does not depend on the world size
            consumed = state["data"][0]["batch"] * state["world_size"]
            data_state = {"epoch": state["data"][0]["epoch"], "batch": consumed // world}
        else:
            raise ValueError(f"{resume_path} was written by {state['world_size']} ranks reading tar shards; "
                             f"resume with --nproc_per_node×nnodes = {state['world_size']}")
    d = recipe.data
    rules = CaptionRules(d.keep_separator, d.group_separator, d.tag_separator, d.tag_dropout, d.group_dropout,
                         d.shuffle_tags, d.caption_dropout)
    spec = SampleSpec(d.resolution, vae.downscale_factor, rules)
    source, micro_per_epoch = make_source(recipe, spec, rank, world, data_state)
    total_steps = t_cfg.max_steps or max(1, int(t_cfg.epochs * micro_per_epoch) // t_cfg.grad_accum)

    # 5. Optimizer (muP groups, fused on GPU), warmup + cosine, GradScaler for fp16.
    o = recipe.optim
    opt, sched = build_optimizer(raw_model, o.lr, o.betas, o.eps, o.weight_decay, o.base_dim,
                                 o.warmup_steps, total_steps, o.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=t_cfg.precision == "fp16")
    start_step, seen = 0, 0
    if state is not None:
        raw_model.load_state_dict(state["model"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step, seen = state["step"], state["samples_seen"]
        if rank == 0:
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(tuple(state["rng"]["python"]))
    if world > 1:
        model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    else:
        model = raw_model
    step_model = torch.compile(model) if recipe.model.compile else model
    autocast = lambda: torch.autocast(device.type, dtype=DTYPES[t_cfg.precision],  # noqa: E731
                                      enabled=t_cfg.precision != "fp32")
    global_batch = t_cfg.batch_size * world * t_cfg.grad_accum
    if is_main:
        print(f"[{recipe.name}] XUT {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params, "
              f"{world} rank(s) on {device}, global batch {global_batch}, {total_steps} steps "
              f"({micro_per_epoch} micro-batches/epoch/rank), resume from {resume_path or 'nothing'}")
        if world != t_cfg.reference_world_size:
            print(f"note: the recipe was tuned for a global batch of "
                  f"{t_cfg.batch_size * t_cfg.reference_world_size * t_cfg.grad_accum}; this run uses {global_batch} "
                  f"(scale train.grad_accum or optim.lr if that matters)")

    # 6. Loop.
    monitor = Monitor(run_dir, total_steps, start_step, is_main, recipe.run.tensorboard)
    stop = StopRequest()
    data = batches(source)
    window = torch.zeros(4, dtype=torch.float64, device=device)   # loss sum, micro-batches, samples, tokens
    counts = [0, 0, 0]
    skipped, window_start, grad_norm, step = 0, time.time(), torch.zeros(()), start_step
    params = [p for p in raw_model.parameters() if p.requires_grad]

    def checkpoint(step: int) -> None:
        data_states = gather(source.state(), world)
        if is_main:
            save_checkpoint(run_dir, step, {
                "step": step, "samples_seen": seen, "world_size": world, "data": data_states,
                "model": raw_model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())},
                "recipe": recipe.to_dict(), "config": cfg.to_dict()}, recipe.run.keep_last)

    try:
        while step < total_steps:
            opt.zero_grad(set_to_none=True)
            for micro in range(t_cfg.grad_accum):
                batch = next(data)
                skipped += batch["skipped"]
                gen = torch.Generator(device).manual_seed(step_seed(t_cfg.seed, rank, step, micro))
                last = micro == t_cfg.grad_accum - 1
                with model.no_sync() if world > 1 and not last else contextlib.nullcontext():
                    loss = training_loss(step_model, batch, text_encoder, vae, recipe, gen, device, autocast)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower optim.lr or use "
                                                 f"train.precision='bf16'")
                    scaler.scale(loss / t_cfg.grad_accum).backward()
                window[0] += loss.detach()
                tokens = batch["pos"].shape[0] * batch["pos"].shape[1] // cfg.patch_size**2
                counts = [counts[0] + 1, counts[1] + len(batch["captions"]), counts[2] + tokens]
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip or float("inf"))
            lr = opt.param_groups[0]["lr"] * opt.param_groups[0]["fan_in"] / o.base_dim  # the recipe-level LR
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                update_ema(ema, raw_model, t_cfg.ema_decay)
            step += 1
            seen += global_batch
            monitor.step()

            if step % recipe.run.log_every == 0 or step == total_steps:
                stats = window.clone()
                stats[1:] = torch.tensor(counts, dtype=stats.dtype)
                if world > 1:
                    dist.all_reduce(stats)
                elapsed = max(time.time() - window_start, 1e-9)
                monitor.log({"step": step, "epoch": round(step * t_cfg.grad_accum / micro_per_epoch, 4),
                             "loss": stats[0].item() / max(stats[1].item(), 1), "lr": lr,
                             "grad_norm": grad_norm.item(), "samples_per_s": stats[2].item() / elapsed,
                             "image_tokens_per_s": stats[3].item() / elapsed, "skipped": skipped})
                window.zero_()
                counts, window_start = [0, 0, 0], time.time()
            rn = recipe.run
            if is_main and rn.sample_every and step % rn.sample_every == 0 and rn.sample_prompts:
                grid = sample_grid(ema if ema is not None else raw_model, text_encoder, vae, rn.sample_prompts,
                                   d.resolution, rn.sample_steps, rn.sample_cfg, rn.sample_seed,
                                   recipe.model.max_length, autocast)
                (run_dir / "samples").mkdir(exist_ok=True)
                grid.save(run_dir / "samples" / f"step_{step:08d}.png")
            stopping = (stop.agreed(world, device) or 0 < args.stop_at <= step) and step < total_steps
            if step % recipe.run.save_every == 0 or step == total_steps or stopping:
                checkpoint(step)
            if stopping:
                monitor.message(f"[{recipe.name}] stopped at step {step}; checkpoint saved, resume with --resume")
                return export_path, False
    finally:
        stop.restore()
        monitor.close()

    # 7. Export in the released single-file layout (EMA weights when EMA is on).
    if is_main:
        final = ema if ema is not None else raw_model
        export_released(export_path, final.state_dict(), cfg, text_encoder, vae, DTYPES[recipe.run.export_dtype],
                        {"hdm.train_step": str(step), "hdm.recipe": recipe.to_dict()})
        (run_dir / "done.json").write_text(json.dumps({"step": step, "export": str(export_path)}))
        print(f"[{recipe.name}] done: {export_path}")
    if world > 1:
        dist.barrier()
    return export_path, True


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train HDM/XUT from TOML recipes (training/recipes/).")
    p.add_argument("--config", action="append", required=True,
                   help="recipe TOML; repeat to chain stages (each starts from the previous export)")
    p.add_argument("--resume", action="store_const", const="auto", default=None,
                   help="continue from the latest checkpoint of each stage's run folder, or start it if none")
    p.add_argument("--resume-from", dest="resume", metavar="PATH", help="continue from this checkpoint .pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=0.1")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--stop-at", type=int, default=0, help="checkpoint and exit after this optimizer step")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="same as --set")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> list[Path]:
    """Run every stage given with --config in order; returns the export paths."""
    rank, world, device = setup_distributed(args.device)
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and not args.resume:
        args.resume = "auto"  # a torchrun restart after a crash always resumes
    if len(args.config) > 1 and args.resume not in (None, "auto"):
        raise ValueError("--resume-from needs a single --config; with chained stages use --resume")
    overrides = list(args.set) + list(args.overrides)
    exports: list[Path] = []
    try:
        for i, path in enumerate(args.config):
            recipe = load_recipe(path, overrides)
            if i > 0:
                recipe.model.init_from = str(exports[-1])
            export, finished = run_stage(recipe, args, rank, world, device)
            exports.append(export)
            if not finished:
                break  # stopped early: later stages must not start from an unfinished one
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return exports


if __name__ == "__main__":
    main(parse_args())
