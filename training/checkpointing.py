"""Training checkpoints (atomic, last K kept; a damaged newest one falls back to the newest intact one), the
run-folder write check, initial weights for a stage, and the released-layout export."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hdm_core import weights
from hdm_core.checkpoint import save_single_file
from hdm_core.config import XUTConfig
from hdm_core.weights import atomic_write

from .encoders import vae_export_parts

CHECKPOINT_RE = re.compile(r"step_(\d+)\.pt$")
CHECKPOINT_KEYS = ("step", "samples_seen", "world_size", "data", "model", "optimizer", "scheduler", "scaler", "rng",
                   "recipe", "config")
log = logging.getLogger("training.checkpointing")


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read back: empty, cut short, or not a training checkpoint."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of an interrupted write are ignored)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def find_resume(run_dir: Path, resume: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint, its contents) to continue from, or (None, None) to start the run.

    --resume ("auto"): the newest intact checkpoint of the run folder; a damaged newer one is reported and left
    in place (the run overwrites it when it reaches that step again), so a restart loop does not fail forever.
    --resume-from PATH: that file. Without either, a run folder that already has checkpoints is an error.
    """
    if resume not in (None, "auto"):
        return Path(resume), load_checkpoint(resume)
    found = list_checkpoints(run_dir)
    if resume is None:
        if found:
            raise FileExistsError(f"{run_dir} already has checkpoints; pass --resume to continue it, or change "
                                  f"name / run.out_dir for a new run")
        return None, None
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except DamagedCheckpoint as err:
            log.warning("%s; resuming from the checkpoint before it (the damaged file is left in place)", err)
    if found:
        raise DamagedCheckpoint(f"every checkpoint in {checkpoint_dir(run_dir)} is damaged "
                                f"({', '.join(p.name for p in found)}); restore one from a backup, or move the "
                                f"folder away to start the run again")
    return None, None


@contextlib.contextmanager
def removed_on_failure(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Run a start-up block; if it raises and `run_dir` did not exist before it, remove what it created (the run
    folder and any parent it made), so a failed start leaves no folder behind. `enabled`: rank 0 only."""
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    try:
        yield
    except BaseException:
        if enabled and created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def check_writable(*folders: Path) -> None:
    """Each folder exists and takes a file, so a read-only folder or a full disk fails before the first training
    step instead of at the first checkpoint."""
    for folder in folders:
        weights.check_writable(folder, "make it writable, free space, or set run.out_dir to a writable folder")


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoints/step_XXXXXXXX.pt via a temporary file and a rename, then drop all but the last K."""
    def write(tmp: Path) -> None:
        try:
            torch.save(state, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk this way; atomic_write names the file
            raise OSError(str(err)) from err

    path = atomic_write(checkpoint_dir(run_dir) / f"step_{step:08d}.pt", write)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint; `DamagedCheckpoint` naming the file when it is empty, cut short or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        if "Weights only load failed" in str(err):  # a whole pickle of other objects, not a cut file
            raise DamagedCheckpoint(f"{path} is not a training checkpoint: it holds objects other than tensors, "
                                    f"which weights-only loading refuses because they could run code") from err
        reason = f"{type(err).__name__}: {str(err)[:120]}" if str(err) else "empty or cut short"
        raise DamagedCheckpoint(f"checkpoint {path} ({path.stat().st_size} bytes) is damaged ({reason})") from err
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise DamagedCheckpoint(f"checkpoint {path} is not a training checkpoint (no {missing}); pass a "
                                f"runs/<name>/checkpoints/step_*.pt file")
    return state


def resume_position(state: dict[str, Any], rank: int, world: int, path: Path) -> dict:
    """This rank's data position in a checkpoint. A folder position is re-dealt to a different world size; a
    tar-shard position needs the same one."""
    if state["world_size"] == world:
        return state["data"][rank]
    if "epoch" in state["data"][0]:  # folder: the global batch list does not depend on the world size
        consumed = state["data"][0]["batch"] * state["world_size"]
        return {"epoch": state["data"][0]["epoch"], "batch": consumed // world}
    raise ValueError(f"{path} was written by {state['world_size']} ranks reading tar shards; "
                     f"resume with --nproc_per_node×nnodes = {state['world_size']}")


def resolve_init_from(source: str) -> Path:
    """The file model.init_from names: itself, or for a run folder its export (else its latest checkpoint)."""
    path = Path(source)
    if path.is_dir():
        exports = sorted((path / "export").glob("*.safetensors"))
        latest = latest_checkpoint(path)
        if exports:
            path = exports[-1]
        elif latest is not None:
            path = latest
        else:
            raise FileNotFoundError(f"model.init_from {source} is a folder without export/*.safetensors or "
                                    f"checkpoints/step_*.pt; point it at the previous stage's export")
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from {source} not found; point it at the previous stage's "
                                f"export (runs/<stage>/export/<stage>.safetensors) or the released checkpoint")
    return path


def load_init_weights(path: Path) -> tuple[dict[str, torch.Tensor], XUTConfig]:
    """XUT weights and config from the file model.init_from resolved to (`resolve_init_from`): a released/exported
    .safetensors or a training .pt; errors name the key."""
    from hdm_core.checkpoint import load_xut

    if path.suffix == ".pt":
        try:
            state = load_checkpoint(path)
        except DamagedCheckpoint as err:
            raise DamagedCheckpoint(f"model.init_from: {err}") from err
        method = state["recipe"].get("finetune", {}).get("method", "full")
        if method != "full":
            raise ValueError(f"model.init_from {path} is a checkpoint of a {method} adapter run: it holds the "
                             f"adapter, not the model. Point model.init_from at the base model, or merge the "
                             f"run's export into it first (python -m hdm_core.merge)")
        weights = state["ema"] if state.get("ema") else state["model"]
        return weights, XUTConfig.from_dict(state["config"])
    try:
        model = load_xut(path, dtype=torch.float32)
    except ValueError as err:  # CheckpointError included
        raise ValueError(f"model.init_from {path}: {err}") from err
    return model.state_dict(), model.config


def export_released(path: Path, model_sd: dict[str, torch.Tensor], config: XUTConfig, text_encoder: Any,
                    vae: Any, dtype: torch.dtype | None, metadata: dict[str, Any] | None = None) -> Path:
    """The single file hdm_core and the ComfyUI loader open: unet.model.*, te.text_models.0.*, vae.*, stats."""
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_single_file(path, model_sd, config, te_sd=text_encoder.model.state_dict(), dtype=dtype,
                     extra_metadata=extra, **vae_export_parts(vae))
    return Path(path)
