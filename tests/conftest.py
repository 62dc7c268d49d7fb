"""Shared fixtures. The golden folder is a parameter: HDM_GOLDEN_DIR points at another set to check it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"reference folder {SHARED_REFERENCE} not found (clone with ../shared beside the repo)")
    return SHARED_REFERENCE


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = Path(os.environ.get("HDM_GOLDEN_DIR", SHARED_REFERENCE / "golden_public"))
    if not (path / "config.json").is_file():
        pytest.skip(f"golden set {path} not found; set HDM_GOLDEN_DIR")
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

TINY_QWEN3 = dict(vocab_size=151936, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
TINY_VAE = dict(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=32, sample_size=32)


def randomized(sd: dict) -> dict:
    """Non-degenerate random values for every floating tensor (zero-initialised layers included)."""
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randn(v.shape, generator=gen) * 0.2 + (1 if k.endswith("norm.weight") else 0)
                if v.is_floating_point() and not k.endswith("time_emb.freqs") else v.clone())
            for k, v in sd.items()}


@pytest.fixture(scope="session")
def tiny_parts() -> dict:
    """State dicts of a tiny XUT (xut-tiny), tiny Qwen3 and tiny VAE, all random."""
    from hdm_core import PRESETS, XUT
    from hdm_core.text_encoder import build_qwen3
    from hdm_core.vae import build_autoencoder

    torch.manual_seed(0)
    return {
        "config": PRESETS["xut-tiny"],
        "unet": randomized(XUT(PRESETS["xut-tiny"]).state_dict()),
        "te": {k: v.clone() for k, v in build_qwen3(TINY_QWEN3).state_dict().items()},
        "vae": {k: v.clone() for k, v in build_autoencoder(TINY_VAE).state_dict().items()},
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
