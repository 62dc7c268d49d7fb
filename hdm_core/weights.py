"""Weights in and out: dtype names, modules built on `meta` and filled by assignment, atomic file writes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError

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
    weights = {k: _cast(k, v, expected[k], dtype, device) for k, v in sd.items() if k in expected}
    check_finite(weights, what=f"{type(module).__name__} weights")
    module.load_state_dict(weights, assign=True)
    return module.eval()


def _cast(key: str, value: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None,
          device: torch.device | str | None) -> torch.Tensor:
    """`value` in `dtype` on `device`; quantised integer weights and uncast fp8 weights are refused by name."""
    if expected.is_floating_point() and not value.is_floating_point():
        raise CheckpointError(f"tensor {key!r} is stored as {value.dtype} (a quantised checkpoint); HDM loads "
                              f"float weights: use the fp16/bf16/fp32 release or dequantise the file first")
    if dtype is None and is_fp8(value.dtype):
        raise CheckpointError(f"tensor {key!r} is stored as {value.dtype}; fp8 weights need a compute dtype: pass "
                              f"dtype=torch.bfloat16 (CLI: --dtype bf16)")
    return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether `dtype` is one of torch's 8-bit float storage types (float8_e4m3fn, float8_e5m2, …)."""
    return dtype.is_floating_point and dtype.itemsize == 1


def check_finite(sd: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise `CheckpointError` naming the tensors that hold NaN or Inf. One sum per tensor (about 0.1 s for the
    343M XUT on one CPU thread); the exact test runs only when a sum is not finite."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v.sum())
           and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensors hold NaN or Inf values, e.g. {bad[:3]}; the file is "
                              f"damaged (or was saved from a diverged run): use another copy or an earlier export")


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
    """Call `write(tmp)` on a temporary file beside `path`, flush it to disk, then rename it over `path`: a crash,
    an error or a full disk never leaves a half-written file (the temporary file is removed on error). The file
    gets the usual permissions (0666 less the umask), so a ComfyUI running as another user can read it. A failed
    write (OSError, or safetensors' SafetensorError for a full disk) is an OSError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(f"could not write {path}: {err.strerror or err}") from err
    except SafetensorError as err:  # safetensors reports I/O errors (a full disk) as its own exception
        raise OSError(f"could not write {path}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable(folder: str | os.PathLike, fix: str, what: str = "") -> None:
    """Create `folder` and write and remove a small file in it, so that a read-only folder or a full disk fails
    before expensive work, with "cannot write to {what}{folder} (reason); {fix}"."""
    folder = Path(folder)
    probe = folder / f".hdm-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"hdm")
    except OSError as err:
        raise OSError(f"cannot write to {what}{folder} ({err.strerror or err}); {fix}") from err
    finally:  # a full disk fails the write after creating the file: it goes too
        with contextlib.suppress(OSError):
            probe.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
