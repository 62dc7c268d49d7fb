"""Shared fixtures. The golden folder is a parameter: HDM_GOLDEN_DIR points at another set to check it."""

from __future__ import annotations

import json
import os
from pathlib import Path

# One thread per process, set before torch is imported: the subprocesses the tests start (trainer runs, torchrun
# DDP workers, the CLI, the ComfyUI server) inherit it, and two DDP workers on 2 cores do not oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # golden vectors, tokenizer ids, key layouts; see tests/data/README.md


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = Path(os.environ.get("HDM_GOLDEN_DIR", DATA / "golden_public"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"golden set {path} has no config.json; point HDM_GOLDEN_DIR at a golden folder")
    return path


@pytest.fixture(scope="session")
def golden_config(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "config.json").read_text())


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The goldens were recorded single-threaded; small models gain nothing from threads anyway.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---------------------------------------------------------------------------------------------------
# Tiny random HDM parts in the released layout
# ---------------------------------------------------------------------------------------------------

def randomized(sd: dict) -> dict:
    """Non-degenerate random values for every floating tensor (zero-initialised layers included)."""
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randn(v.shape, generator=gen) * 0.2 + (1 if k.endswith("norm.weight") else 0)
                if v.is_floating_point() and not k.endswith("time_emb.freqs") else v.clone())
            for k, v in sd.items()}


@pytest.fixture(scope="session")
def tiny_parts() -> dict:
    """State dicts of a tiny XUT (xut-tiny), tiny Qwen3 and tiny VAE (the "tiny" presets), all random."""
    from hdm_core import PRESETS, XUT
    from hdm_core.text_encoder import QWEN3_PRESETS, build_qwen3
    from hdm_core.vae import VAE_PRESETS, build_autoencoder

    torch.manual_seed(0)
    return {
        "config": PRESETS["xut-tiny"],
        "unet": randomized(XUT(PRESETS["xut-tiny"]).state_dict()),
        "te": {k: v.clone() for k, v in build_qwen3(QWEN3_PRESETS["tiny"]).state_dict().items()},
        "vae": {k: v.clone() for k, v in build_autoencoder(VAE_PRESETS["tiny"]).state_dict().items()},
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_parts, tmp_path_factory) -> Path:
    """A tiny single-file checkpoint in the released layout (float32)."""
    from hdm_core.checkpoint import save_single_file
    from hdm_core.vae import EQVAE_MEAN, EQVAE_STD

    path = tmp_path_factory.mktemp("ckpt") / "tiny_hdm.safetensors"
    save_single_file(path, tiny_parts["unet"], tiny_parts["config"], te_sd=tiny_parts["te"],
                     vae_sd=tiny_parts["vae"], vae_mean=torch.tensor(EQVAE_MEAN), vae_std=torch.tensor(EQVAE_STD))
    return path
