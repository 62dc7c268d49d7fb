"""Training checkpoints (atomic, last K kept), initial weights for a stage, and the released-layout export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from hdm_core.checkpoint import save_single_file
from hdm_core.config import XUTConfig
from hdm_core.weights import atomic_write

from .encoders import vae_export_parts

CHECKPOINT_RE = re.compile(r"step_(\d+)\.pt$")


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


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from (--resume: the latest, if any; --resume-from: that one); without either,
    a run folder that already has checkpoints is an error."""
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume:
        return Path(resume)
    if latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already has checkpoints; pass --resume to continue it, or change "
                              f"name / run.out_dir for a new run")
    return None


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoints/step_XXXXXXXX.pt via a temporary file and a rename, then drop all but the last K."""
    path = atomic_write(checkpoint_dir(run_dir) / f"step_{step:08d}.pt", lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_resume(path: Path | None, rank: int, world: int) -> tuple[dict[str, Any] | None, dict | None]:
    """(checkpoint, this rank's data position in it), or (None, None) without one. A folder position is re-dealt
    to a different world size; a tar-shard position needs the same one."""
    if path is None:
        return None, None
    state = load_checkpoint(path)
    if state["world_size"] == world:
        return state, state["data"][rank]
    if "epoch" in state["data"][0]:  # folder: the global batch list does not depend on the world size
        consumed = state["data"][0]["batch"] * state["world_size"]
        return state, {"epoch": state["data"][0]["epoch"], "batch": consumed // world}
    raise ValueError(f"{path} was written by {state['world_size']} ranks reading tar shards; "
                     f"resume with --nproc_per_node×nnodes = {state['world_size']}")


def load_init_weights(source: str) -> tuple[dict[str, torch.Tensor], XUTConfig]:
    """XUT weights and config from a released/exported .safetensors, a training .pt, or a run folder."""
    from hdm_core.checkpoint import load_xut

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
    if path.suffix == ".pt":
        state = load_checkpoint(path)
        weights = state["ema"] if state.get("ema") else state["model"]
        return weights, XUTConfig.from_dict(state["config"])
    model = load_xut(path, dtype=torch.float32)
    return model.state_dict(), model.config


def export_released(path: Path, model_sd: dict[str, torch.Tensor], config: XUTConfig, text_encoder: Any,
                    vae: Any, dtype: torch.dtype | None, metadata: dict[str, Any] | None = None) -> Path:
    """The single file hdm_core and the ComfyUI loader open: unet.model.*, te.text_models.0.*, vae.*, stats."""
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_single_file(path, model_sd, config, te_sd=text_encoder.model.state_dict(), dtype=dtype,
                     extra_metadata=extra, **vae_export_parts(vae))
    return Path(path)
