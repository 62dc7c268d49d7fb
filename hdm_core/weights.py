"""Weights in and out: dtype names, modules built on `meta` and filled by assignment, atomic file writes."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

# The dtype names the CLI, the recipes and the ComfyUI loaders accept.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

M = TypeVar("M", bound=torch.nn.Module)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message says what was found and what to do."""


def build_with_weights(build: Callable[[], M], sd: Mapping[str, torch.Tensor], *, what: str,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                       strict: bool = True) -> M:
    """`build()` on the meta device, then filled with `sd` by assignment, so no weights are allocated twice.

    Floating tensors are cast to `dtype` (None keeps theirs) and all are moved to `device` (None keeps theirs).
    Every mismatch (shape, missing key, or with `strict` an unexpected key) raises `CheckpointError`, whose
    message starts with `what`. Non-persistent buffers stay on meta: the caller recomputes them.
    """
    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    check_weights(expected, sd, what=what, strict=strict)
    weights = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
               for k, v in sd.items() if k in expected}
    module.load_state_dict(weights, assign=True)
    return module.eval()


def check_weights(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], *, what: str,
                  strict: bool = True) -> None:
    """Raise `CheckpointError` (message starting with `what`) unless `sd` has every key of `expected` with its
    shape (and, with `strict`, no other key)."""
    mismatched = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
                  for k, v in sd.items() if k in expected and v.shape != expected[k].shape]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if mismatched or missing or (strict and unexpected):
        raise CheckpointError(f"{what}: {len(mismatched)} mismatched shapes {mismatched[:3]}, {len(missing)} "
                              f"missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`: a crash or an error
    never leaves a half-written file (the temporary file is removed on error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
