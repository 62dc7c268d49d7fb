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
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from hdm_core.adapters import save_adapter
from hdm_core.config import XUTConfig
from hdm_core.weights import DTYPES, atomic_write
from hdm_core.xut import XUT

from .checkpointing import (
    check_writable,
    checkpoint_dir,
    export_released,
    find_resume,
    load_init_weights,
    resume_position,
    save_checkpoint,
)
from .data import Batch
from .encoders import build_text_encoder, build_vae
from .finetune import Adapters, check_recipe, export_metadata
from .loss import training_loss
from .model import build_model, build_trainee, check_fit, model_config
from .monitor import Meter, Monitor, sample_grid
from .optim import WarmupCosine, build_optimizer, lr_schedule, update_ema
from .recipe import Recipe, check_resumable, load_recipe
from .runtime import StopRequest, gather, mix_seed, setup_distributed
from .sources import build_data
from .validation import open_validation, validation_loss

# ---------------------------------------------------------------------------------------------------
# Helpers: data
# ---------------------------------------------------------------------------------------------------

def forever(source: Any) -> Iterator[Batch]:
    while True:
        yield from source


# ---------------------------------------------------------------------------------------------------
# One stage: build, restore, loop, checkpoint, export
# ---------------------------------------------------------------------------------------------------

@dataclass
class Stage:
    """One recipe's training run: what `build_stage` makes and `train_loop` advances."""

    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    config: XUTConfig
    model: XUT                           # the weights that are checkpointed and exported
    ema: XUT | None
    text_encoder: Any
    vae: Any
    source: Any                          # FolderSource or ShardSource
    micro_per_epoch: int
    total_steps: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    schedule: WarmupCosine               # LR of step s = optim.lr · schedule(s)
    scaler: torch.amp.GradScaler
    step: int = 0
    seen: int = 0                        # samples, all ranks
    skipped: int = 0                     # unreadable files met by this rank in this process
    skipped_before: int = 0              # ... by all ranks before this process (from the checkpoint)
    adapters: Adapters | None = None     # adapter runs: the trained part (the XUT is frozen)
    validation: list[Batch] | None = None  # this rank's fixed validation batches (None: no validation data)
    ddp: torch.nn.Module | None = None   # `model` (or the AdaptedXUT) behind DDP when world > 1
    forward: torch.nn.Module | None = None  # `ddp`, compiled when model.compile: computes the loss

    @property
    def trainable(self) -> torch.nn.Module:
        """What the optimizer updates and a checkpoint holds: the adapters, or the whole XUT."""
        return self.adapters if self.adapters is not None else self.model

    @property
    def global_batch(self) -> int:
        return self.recipe.train.batch_size * self.world * self.recipe.train.grad_accum

    def autocast(self) -> contextlib.AbstractContextManager:
        precision = self.recipe.train.precision
        return torch.autocast(self.device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def restore(st: Stage, state: dict) -> None:
    """Weights, optimizer, schedule, scaler, counters and (rank 0) RNG states of a checkpoint."""
    st.trainable.load_state_dict(state["model"])
    if st.ema is not None and state.get("ema"):
        st.ema.load_state_dict(state["ema"])
    st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the checkpoint's train.precision was not fp16: start a fresh scale
        st.scaler.load_state_dict(state["scaler"])
    st.step, st.seen, st.skipped_before = state["step"], state["samples_seen"], state.get("skipped", 0)
    if st.rank == 0:
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(tuple(state["rng"]["python"]))


def build_stage(recipe: Recipe, rank: int, world: int, device: torch.device, resume_path: Path | None,
                state: dict | None) -> Stage:
    """Encoders, model + EMA, data, optimizer, restored from checkpoint `state` when given, then DDP / compile."""
    # 1. Frozen encoders.
    enc_dtype = DTYPES[recipe.model.encoder_dtype] if device.type == "cuda" else torch.float32
    text_encoder = build_text_encoder(recipe.model.text_encoder, enc_dtype, device)
    vae = build_vae(recipe.model.vae, enc_dtype, device)
    # 2. Model: from scratch (official init) or from model.init_from; EMA; adapters on the frozen model.
    init_sd, init_cfg = load_init_weights(recipe.model.init_from) if recipe.model.init_from else (None, None)
    cfg = model_config(recipe, init_cfg)
    if state is not None and XUTConfig.from_dict(state["config"]) != cfg:
        raise ValueError(f"cannot resume {resume_path}: its model config {state['config']} is not this run's "
                         f"{cfg.to_dict()}; start a new run (name / run.out_dir) with model.init_from={resume_path}")
    check_fit(recipe, cfg, text_encoder, vae)
    model, ema = build_model(recipe, cfg, init_sd, device)
    adapters, trainee = build_trainee(recipe, model, text_encoder)
    # 3. Data, from the checkpoint's position when resuming.
    data_state = resume_position(state, rank, world, resume_path) if state is not None else None
    source, micro_per_epoch = build_data(recipe, vae.downscale_factor, rank, world, data_state)
    validation = open_validation(recipe, vae.downscale_factor, rank, world)
    t = recipe.train
    total_steps = t.max_steps or max(1, int(t.epochs * micro_per_epoch) // t.grad_accum)
    # 4. Optimizer (muP groups, fused on GPU), warmup + cosine, GradScaler for fp16; restore a checkpoint.
    opt, sched = build_optimizer(adapters if adapters is not None else model, recipe.optim, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    st = Stage(recipe=recipe, rank=rank, world=world, device=device, config=cfg, model=model, ema=ema,
               text_encoder=text_encoder, vae=vae, source=source, micro_per_epoch=micro_per_epoch,
               total_steps=total_steps, opt=opt, sched=sched, schedule=lr_schedule(recipe.optim, total_steps),
               scaler=scaler, adapters=adapters, validation=validation)
    if state is not None:
        restore(st, state)
    # 5. DDP and compile wrap the restored model.
    st.ddp = DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None,
                 gradient_as_bucket_view=True) if world > 1 else trainee
    st.forward = torch.compile(st.ddp) if recipe.model.compile else st.ddp
    return st


def announce(st: Stage, resume_path: Path | None) -> None:
    """The run's size and batch on rank 0, and a note when the world size is not the recipe's."""
    if st.rank != 0:
        return
    t, init_from = st.recipe.train, st.recipe.model.init_from
    start = f"resumes from {resume_path}" if resume_path else f"starts from {init_from}" if init_from else \
        "starts from the official initialisation"
    print(f"[{st.recipe.name}] XUT {sum(p.numel() for p in st.model.parameters()) / 1e6:.2f}M params, "
          f"{st.world} rank(s) on {st.device}, global batch {st.global_batch}, {st.total_steps} steps "
          f"({st.micro_per_epoch} micro-batches/epoch/rank); {start}")
    if st.adapters is not None:
        ft, trained = st.recipe.finetune, sum(p.numel() for p in st.adapters.parameters())
        print(f"[{st.recipe.name}] {ft.method} adapter on {len(st.adapters.paths)} modules "
              f"({', '.join(ft.modules)}{', norms' if ft.train_norm else ''}): {trained / 1e6:.3f}M trainable "
              f"parameters; the base weights are frozen")
    if st.world != t.reference_world_size:
        print(f"note: the recipe was tuned for a global batch of "
              f"{t.batch_size * t.reference_world_size * t.grad_accum}; this run uses {st.global_batch} "
              f"(scale train.grad_accum or optim.lr if that matters)")


def optimizer_step(st: Stage, data: Iterator[Batch], meter: Meter) -> torch.Tensor:
    """One optimizer step over train.grad_accum micro-batches (gradients all-reduced on the last) → grad norm."""
    t = st.recipe.train
    st.opt.zero_grad(set_to_none=True)
    for micro in range(t.grad_accum):
        batch = next(data)
        st.skipped += batch.skipped
        gen = torch.Generator(st.device).manual_seed(mix_seed(t.seed, st.rank, st.step, micro))
        last = micro == t.grad_accum - 1
        with st.ddp.no_sync() if st.world > 1 and not last else contextlib.nullcontext():
            loss = training_loss(st.forward, batch.to(st.device), st.text_encoder, st.vae, st.recipe.model, gen,
                                 st.autocast, st.config.patch_size, train_text=st.recipe.finetune.adapts_text_encoder)
            st.scaler.scale(loss / t.grad_accum).backward()
        meter.add(loss, len(batch.captions), batch.pos.shape[0] * batch.pos.shape[1] // st.config.patch_size**2)
    st.scaler.unscale_(st.opt)
    params = [p for p in st.trainable.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, st.recipe.optim.grad_clip or float("inf"))
    st.scaler.step(st.opt)
    st.scaler.update()
    st.sched.step()
    if st.ema is not None:
        update_ema(st.ema, st.model, t.ema_decay)
    st.step += 1
    st.seen += st.global_batch
    return grad_norm


def save(st: Stage) -> None:
    """A checkpoint with everything a resume needs; every rank's data position is gathered, rank 0 writes."""
    data_states, skipped = zip(*gather((st.source.state(), st.skipped), st.world))
    if st.rank == 0:
        save_checkpoint(st.recipe.run_dir, st.step, {
            "step": st.step, "samples_seen": st.seen, "world_size": st.world, "data": list(data_states),
            "skipped": st.skipped_before + sum(skipped),
            "model": st.trainable.state_dict(), "ema": st.ema.state_dict() if st.ema is not None else None,
            "optimizer": st.opt.state_dict(), "scheduler": st.sched.state_dict(), "scaler": st.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())},
            "recipe": st.recipe.to_dict(), "config": st.config.to_dict()}, st.recipe.run.keep_last)


def validate(st: Stage) -> float | str:
    """The validation loss of the model (the EMA when on); "" without validation data."""
    r = st.recipe
    if st.validation is None:
        return ""
    model = st.ema if st.ema is not None else st.model
    return validation_loss(model, st.validation, st.text_encoder, st.vae, r.model, st.autocast,
                           st.config.patch_size, r.train.seed, st.device, st.world)


def save_samples(st: Stage, monitor: Monitor | None = None) -> None:
    """A grid of run.sample_prompts from the EMA (or the model), labelled, in run_dir/samples/ and TensorBoard."""
    grid = sample_grid(st.ema if st.ema is not None else st.model, st.text_encoder, st.vae, st.recipe, st.autocast)
    atomic_write(st.recipe.run_dir / "samples" / f"step_{st.step:08d}.png", lambda tmp: grid.save(tmp, "PNG"))
    if monitor is not None:
        monitor.image("samples", grid, st.step, list(st.recipe.run.sample_prompts))


def train_loop(st: Stage, stop_at: int) -> bool:
    """Optimizer steps to the end (True) or to a stop request / --stop-at (False), logging and checkpointing."""
    r = st.recipe
    monitor = Monitor(r.run_dir, st.total_steps, st.step, st.rank == 0, r.run.tensorboard)
    stop, meter, data = StopRequest(), Meter(st.device), forever(st.source)
    try:
        while st.step < st.total_steps:
            lr = r.optim.lr * st.schedule(st.step)  # the recipe-level LR of this step
            grad_norm = optimizer_step(st, data, meter)
            monitor.step()
            validating = st.validation is not None and st.step % r.run.val_every == 0
            logging = st.step % r.run.log_every == 0 or st.step == st.total_steps or validating
            if logging:
                meter.raise_if_diverged(st.world, st.step)
                stats = meter.read(st.world, skipped=st.skipped)
                monitor.log({"step": st.step, "epoch": round(st.step * r.train.grad_accum / st.micro_per_epoch, 4),
                             **stats, "lr": lr, "grad_norm": grad_norm.item(),
                             "val_loss": validate(st) if validating or st.step == st.total_steps else "",
                             "skipped": st.skipped_before + stats["skipped"]})
            if st.rank == 0 and r.run.sample_every and st.step % r.run.sample_every == 0 and r.run.sample_prompts:
                save_samples(st, monitor)
            stopping = (stop.agreed(st.world, st.device) or 0 < stop_at <= st.step) and st.step < st.total_steps
            if st.step % r.run.save_every == 0 or st.step == st.total_steps or stopping:
                if not logging:
                    meter.raise_if_diverged(st.world, st.step)
                save(st)
            if stopping:
                monitor.message(f"[{r.name}] stopped at step {st.step}; checkpoint saved, resume with --resume")
                return False
    finally:
        stop.restore()
        monitor.close()
    return True


def export(st: Stage, path: Path) -> None:
    """The released single-file layout (EMA weights when EMA is on), or for an adapter run the adapter in ComfyUI's
    LoRA keys; then done.json. Every rank waits for it."""
    r, dtype = st.recipe, DTYPES[st.recipe.run.export_dtype]
    if st.rank == 0:
        if st.adapters is not None:
            tensors = {k: v.to(dtype) for k, v in st.adapters.export_tensors().items()}
            save_adapter(path, tensors, export_metadata(r.finetune, Path(r.model.init_from).name, st.step,
                                                        r.to_dict()))
        else:
            final = st.ema if st.ema is not None else st.model
            export_released(path, final.state_dict(), st.config, st.text_encoder, st.vae, dtype,
                            {"hdm.train_step": str(st.step), "hdm.recipe": r.to_dict()})
        done = json.dumps({"step": st.step, "export": str(path)})
        atomic_write(st.recipe.run_dir / "done.json", lambda tmp: tmp.write_text(done))
        print(f"[{st.recipe.name}] done: {path}")
    if st.world > 1:
        dist.barrier()


def run_stage(recipe: Recipe, args: argparse.Namespace, rank: int, world: int,
              device: torch.device) -> tuple[Path, bool]:
    """Train one recipe to the end or to a stop request → (path of its export, finished)."""
    run_dir = recipe.run_dir
    export_path = run_dir / "export" / f"{recipe.name}.safetensors"
    check_recipe(recipe.finetune, recipe.model.init_from, recipe.train.ema_decay, recipe.model.compile,
                 recipe.data.cache)
    if args.resume and (run_dir / "done.json").is_file() and export_path.is_file():
        if rank == 0:
            print(f"[{recipe.name}] already finished ({export_path}); skipping")
        return export_path, True
    resume_path, state = find_resume(run_dir, args.resume)
    if state is not None:
        check_resumable(state["recipe"], recipe.to_dict(), resume_path)
    if rank == 0:  # a read-only folder or a full disk fails now, not at the first checkpoint
        check_writable(run_dir, checkpoint_dir(run_dir), run_dir / "export",
                       *([run_dir / "samples"] if recipe.run.sample_every and recipe.run.sample_prompts else []))
        text = json.dumps(recipe.to_dict(), indent=2)
        atomic_write(run_dir / "recipe.json", lambda tmp: tmp.write_text(text))
    # A different seed per rank (DiT); per-step noise comes from mix_seed, not from a stream.
    torch.manual_seed(recipe.train.seed * world + rank)
    random.seed(recipe.train.seed * world + rank)
    st = build_stage(recipe, rank, world, device, resume_path, state)
    del state  # restored into the model and optimizer; do not hold a second copy while training
    announce(st, resume_path)
    if not train_loop(st, args.stop_at):
        return export_path, False
    export(st, export_path)
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
    recipes = [load_recipe(path, overrides) for path in args.config]
    for recipe in recipes[:-1]:
        if recipe.finetune.adapter:
            raise ValueError(f"{recipe.name} trains a {recipe.finetune.method} adapter, so it can only be the last "
                             f"stage of a chain: merge it first (python -m hdm_core.merge) and start the next "
                             f"stage from the merged file with model.init_from")
    exports: list[Path] = []
    try:
        for i, recipe in enumerate(recipes):
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
