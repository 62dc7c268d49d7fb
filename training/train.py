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
import dataclasses
import json
import os
import random
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from hdm_core.adapters import save_adapter
from hdm_core.cli import ArgumentParser, Stopped, run_tool
from hdm_core.weights import DTYPES, atomic_write

from .checkpointing import export_released, save_checkpoint
from .data import Batch
from .finetune import check_recipe, export_metadata
from .loss import training_loss
from .monitor import Meter, Monitor, sample_grid
from .optim import update_ema
from .recipe import Recipe, load_recipe
from .runtime import StopRequest, gather, mix_seed, setup_distributed
from .stage import Stage, start_stage
from .validation import validation_loss

# ---------------------------------------------------------------------------------------------------
# Helpers: data
# ---------------------------------------------------------------------------------------------------

def forever(source: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        yield from source


# ---------------------------------------------------------------------------------------------------
# One stage (built by training/stage.py): loop, checkpoint, export
# ---------------------------------------------------------------------------------------------------

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
            loss = training_loss(st.forward, batch.to(st.device), st.encoders.text, st.encoders.vae, st.recipe.model,
                                 gen, st.autocast, st.config.patch_size,
                                 train_text=st.recipe.finetune.adapts_text_encoder)
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
            "recipe": st.recipe.to_dict(), "config": st.config.to_dict(),
            "base": dataclasses.asdict(st.base) if st.base is not None else None}, st.recipe.run.keep_last)


def validate(st: Stage) -> float | str:
    """The validation loss of the model (the EMA when on); "" without validation data."""
    r = st.recipe
    if st.validation is None:
        return ""
    model = st.ema if st.ema is not None else st.model
    return validation_loss(model, st.validation, st.encoders.text, st.encoders.vae, r.model, st.autocast,
                           st.config.patch_size, r.train.seed, st.device, st.world)


def save_samples(st: Stage, monitor: Monitor | None = None) -> None:
    """A grid of run.sample_prompts from the EMA (or the model), labelled, in run_dir/samples/ and TensorBoard."""
    grid = sample_grid(st.ema if st.ema is not None else st.model, st.encoders.text, st.encoders.vae, st.recipe,
                       st.autocast)
    atomic_write(st.recipe.run_dir / "samples" / f"step_{st.step:08d}.png", lambda tmp: grid.save(tmp, "PNG"))
    if monitor is not None:
        monitor.image("samples", grid, st.step, list(st.recipe.run.sample_prompts))


def sampling(st: Stage) -> bool:
    """Whether this rank writes sample grids (rank 0, run.sample_every > 0 and run.sample_prompts given)."""
    return st.rank == 0 and bool(st.recipe.run.sample_every) and bool(st.recipe.run.sample_prompts)


def train_loop(st: Stage, stop_at: int) -> bool:
    """Optimizer steps to the end (True) or to --stop-at (False), logging, sampling (a step-0 grid first, as the
    baseline) and checkpointing; a stop signal saves a checkpoint, then raises `Stopped` (exit 128 + signum)."""
    r = st.recipe
    monitor = Monitor(r.run_dir, st.total_steps, st.step, st.rank == 0, r.run.tensorboard)
    stop, meter, data = StopRequest(), Meter(st.device), forever(st.source)
    try:
        if st.step == 0 and sampling(st):
            save_samples(st, monitor)  # what the base (or the fresh init) draws: the baseline of every later grid
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
            if sampling(st) and st.step % r.run.sample_every == 0:
                save_samples(st, monitor)
            signalled = stop.agreed(st.world, st.device)
            stopping = (signalled or 0 < stop_at <= st.step) and st.step < st.total_steps
            if st.step % r.run.save_every == 0 or st.step == st.total_steps or stopping:
                if not logging:
                    meter.raise_if_diverged(st.world, st.step)
                save(st)
            if stopping:
                monitor.message(f"[{r.name}] stopped at step {st.step}; checkpoint saved, resume with --resume")
                if signalled:
                    raise Stopped(stop.signum)
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
            save_adapter(path, tensors, export_metadata(r.finetune, st.adapters, st.base, st.step, r.to_dict()))
        else:
            final = st.ema if st.ema is not None else st.model
            base = {"hdm.base": st.base.name, "hdm.base_fingerprint": st.base.fingerprint} if st.base else {}
            export_released(path, final.state_dict(), st.config, st.encoders.text, st.encoders.vae, dtype,
                            {"hdm.train_step": str(st.step), "hdm.recipe": r.to_dict(), **base})
        done = json.dumps({"step": st.step, "export": str(path)})
        atomic_write(st.recipe.run_dir / "done.json", lambda tmp: tmp.write_text(done))
        print(f"[{st.recipe.name}] done: {path}")
    if st.world > 1:
        dist.barrier()


def run_stage(recipe: Recipe, resume: str | None, stop_at: int, rank: int, world: int,
              device: torch.device) -> tuple[Path, bool]:
    """Train one recipe to the end or to --stop-at → (path of its export, finished). `resume`: None, "auto"
    (--resume) or a checkpoint path (--resume-from)."""
    export_path = recipe.run_dir / "export" / f"{recipe.name}.safetensors"
    check_recipe(recipe.finetune, recipe.model.init_from, recipe.train.ema_decay, recipe.model.compile,
                 recipe.data.cache)
    if resume and (recipe.run_dir / "done.json").is_file() and export_path.is_file():
        if rank == 0:
            print(f"[{recipe.name}] already finished ({export_path}); skipping")
        return export_path, True
    st = start_stage(recipe, resume, rank, world, device)
    if not train_loop(st, stop_at):
        return export_path, False
    export(st, export_path)
    return export_path, True


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m training.train",
                       description="Train HDM/XUT from TOML recipes (training/recipes/).")
    p.add_argument("--config", action="append", required=True,
                   help="recipe TOML; repeat to chain stages (each starts from the previous export)")
    p.add_argument("--resume", action="store_const", const="auto", default=None,
                   help="continue from the latest checkpoint of each stage's run folder, or start it if none")
    p.add_argument("--resume-from", dest="resume", metavar="PATH", help="continue from this checkpoint .pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=0.1")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--stop-at", type=int, default=0, help="checkpoint and exit after this optimizer step")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="same as --set")
    return p.parse_intermixed_args(argv)  # overrides may come before, between and after the options


def with_init_from(recipe: Recipe, path: Path) -> Recipe:
    """A copy of `recipe` that starts from `path` (the previous stage's export)."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, init_from=str(path)))


def main(args: argparse.Namespace) -> list[Path]:
    """Run every stage given with --config in order; returns the export paths. A stop signal raises `Stopped`
    once its checkpoint is saved."""
    rank, world, device = setup_distributed(args.device)
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    resume = args.resume or ("auto" if restarted else None)  # a torchrun restart after a crash always resumes
    if len(args.config) > 1 and resume not in (None, "auto"):
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
            export, finished = run_stage(with_init_from(recipe, exports[-1]) if i else recipe, resume, args.stop_at,
                                         rank, world, device)
            exports.append(export)
            if not finished:
                break  # stopped early: later stages must not start from an unfinished one
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return exports


STOPPED_AT_ONCE = ("stopped at once by {what}: the steps since the last checkpoint are lost (a start stopped before "
                   "its first checkpoint leaves no run folder); --resume continues from the last checkpoint")


def cli_main(argv: list[str] | None = None) -> int:
    """`python -m training.train`: exit 0 when every stage finished or stopped at --stop-at, 2 with one `error:`
    line for a user error, 130 / 143 after Ctrl-C / SIGTERM (during the steps: once the checkpoint is saved;
    while starting, exporting, or on a second Ctrl-C: at once)."""
    args = parse_args(argv)

    def stop_at_once(signum: int, frame: object) -> None:  # StopRequest takes over during the training steps
        raise Stopped(signum, STOPPED_AT_ONCE.format(what="SIGTERM"))
    previous = signal.signal(signal.SIGTERM, stop_at_once)
    try:
        return run_tool(lambda: main(args), cancelled=STOPPED_AT_ONCE.format(what="Ctrl-C"))
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(cli_main())
