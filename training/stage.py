"""A stage of training built and ready to run: the `Stage` record (recipe, model, encoders, data, optimizer, position)
and how it is made: `start_stage` resolves the resume, checks the run folder and builds everything (`build_stage`)
in the order that fails cheapest first."""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from hdm_core.config import XUTConfig
from hdm_core.weights import DTYPES, atomic_write
from hdm_core.xut import XUT

from .checkpointing import (
    check_writable,
    checkpoint_dir,
    find_resume,
    load_init_weights,
    removed_on_failure,
    resolve_init_from,
    resume_position,
)
from .data import Batch, FolderSource
from .encoders import Encoders, build_encoder
from .finetune import Adapters, BaseIdentity
from .model import build_model, build_trainee, check_fit, model_config
from .optim import WarmupCosine, build_optimizer, lr_schedule
from .recipe import Recipe, check_resumable
from .shards import ShardSource
from .sources import build_data
from .validation import open_validation


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
    encoders: Encoders                   # frozen text encoder and VAE
    source: FolderSource | ShardSource
    micro_per_epoch: int
    total_steps: int
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    schedule: WarmupCosine               # LR of step s = optim.lr · schedule(s)
    scaler: torch.amp.GradScaler
    base: BaseIdentity | None = None     # model.init_from's file and fingerprint (None: from scratch)
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
    """Base weights, VAE, data, text encoder, model + EMA, optimizer, restored from checkpoint `state` when given, then
    DDP / compile. The cheap and likely failures come first: the base file, then the data before the text encoder."""
    m = recipe.model
    # 1. The base: model.init_from (and, for an adapter run resumed, the base its adapter was trained on).
    init_file = resolve_init_from(m.init_from) if m.init_from else None
    base = BaseIdentity.of(init_file) if init_file is not None else None
    if state is not None and base is not None and recipe.finetune.adapter:
        base.check_resume(state.get("base"), resume_path)
    init_sd, init_cfg = load_init_weights(init_file) if init_file is not None else (None, None)
    cfg = model_config(recipe, init_cfg)
    if state is not None and XUTConfig.from_dict(state["config"]) != cfg:
        raise ValueError(f"cannot resume {resume_path}: its model config {state['config']} is not this run's "
                         f"{cfg.to_dict()}; start a new run (name / run.out_dir) with model.init_from={resume_path}")
    # 2. The VAE (small; the data needs its factor), the data from the checkpoint's position, the text encoder.
    vae = build_encoder("vae", m, init_file, device)
    data_state = resume_position(state, rank, world, resume_path) if state is not None else None
    source, micro_per_epoch = build_data(recipe, vae.downscale_factor, rank, world, data_state)
    validation = open_validation(recipe, vae.downscale_factor, rank, world)
    encoders = Encoders(text=build_encoder("text_encoder", m, init_file, device), vae=vae)
    check_fit(recipe, cfg, encoders.text, encoders.vae)
    # 3. Model: from scratch (official init) or from model.init_from's weights; EMA; adapters on the frozen model.
    model, ema = build_model(recipe, cfg, init_sd, device)
    adapters, trainee = build_trainee(recipe, model, encoders.text)
    t = recipe.train
    total_steps = t.max_steps or max(1, int(t.epochs * micro_per_epoch) // t.grad_accum)
    # 4. Optimizer (muP groups, fused on GPU), warmup + cosine, GradScaler for fp16; restore a checkpoint.
    opt, sched = build_optimizer(adapters if adapters is not None else model, recipe.optim, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    st = Stage(recipe=recipe, rank=rank, world=world, device=device, config=cfg, model=model, ema=ema,
               encoders=encoders, source=source, micro_per_epoch=micro_per_epoch, total_steps=total_steps, opt=opt,
               sched=sched, schedule=lr_schedule(recipe.optim, total_steps), scaler=scaler, base=base,
               adapters=adapters, validation=validation)
    if state is not None:
        restore(st, state)
    # 5. DDP and compile wrap the restored model.
    st.ddp = DDP(trainee, device_ids=[device.index] if device.type == "cuda" else None,
                 gradient_as_bucket_view=True) if world > 1 else trainee
    st.forward = torch.compile(st.ddp) if m.compile else st.ddp
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
        used = st.adapters.factors_used
        if used:
            first = next(iter(used))
            print(f"note: finetune.factor {ft.factor} does not divide the sizes of {len(used)} of the "
                  f"{len(st.adapters.paths)} modules, so LyCORIS chose another factor there (e.g. {first}: "
                  f"{used[first][0]} x {used[first][1]}); the export records each one (hdm.adapter: factors_used)")
    if st.world != t.reference_world_size:
        print(f"note: the recipe was tuned for a global batch of "
              f"{t.batch_size * t.reference_world_size * t.grad_accum}; this run uses {st.global_batch} "
              f"(scale train.grad_accum or optim.lr if that matters)")


def start_stage(recipe: Recipe, resume: str | None, rank: int, world: int, device: torch.device) -> Stage:
    """Resolve the resume, check the run folder is writable, write recipe.json, build the stage. A failed start leaves
    no run folder behind when it made one."""
    run_dir = recipe.run_dir
    resume_path, state = find_resume(run_dir, resume)
    if state is not None:
        check_resumable(state["recipe"], recipe.to_dict(), resume_path)
    with removed_on_failure(run_dir, enabled=rank == 0):
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
    return st
