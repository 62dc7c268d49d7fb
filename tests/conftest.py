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
