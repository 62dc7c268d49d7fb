"""What every command-line tool of the project does the same way: `python -m hdm_core.generate`, `hdm_core.merge`,
`hdm_core.convert_lycoris` and the trainer `python -m training.train`.

* CPU threads: one per process unless OMP_NUM_THREADS says otherwise (`set_cpu_threads`).
* Exit codes: 0 done, 2 a user error (printed as one line `error: …`, usage errors included), 130 / 143 stopped
  by Ctrl-C / SIGTERM (128 + the signal's number, as a shell reports it), so `a && b` never goes on after a stop.
* Files: pickles are refused by name (`refuse_pickle`), inputs are checked before any work (`check_input_file`),
  outputs are `.safetensors` paths in a writable folder that are none of the inputs (`check_output`; an existing
  output is replaced, atomically), and what a tool wrote records its sources (`file_record`: name and sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .sampling import SamplingCancelled
from .weights import CheckpointError, check_writable

EXIT_OK, EXIT_USER_ERROR = 0, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: Ctrl-C
USER_ERRORS = (ValueError, OSError, FloatingPointError)  # CheckpointError is a ValueError
CPU_THREADS = 1  # intra-op threads of a CPU process when OMP_NUM_THREADS is not set
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class Stopped(Exception):
    """A tool stopped on a signal after saving its work: `run_tool` prints `message` and exits 128 + `signum`."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum, self.message = signum, message


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: … (see PROG --help)`, and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def set_cpu_threads() -> int:
    """Fix this process's intra-op threads: OMP_NUM_THREADS when set (the override), else CPU_THREADS → the count.

    A fixed number, never derived from the cores or the load: float sums split across another thread count
    round differently, so a run's result would change with the machine's load. One thread is also the safe
    choice where cores are shared: on a busy 2-core machine PyTorch's default (one thread per core) ran the demo's
    training steps 13 times slower than one thread and sampled 20 to 50 times slower, while on an idle one it was
    at most 1.4 times faster (figures: demo/README.md, docs/troubleshooting.md). torchrun sets OMP_NUM_THREADS=1
    for every process it starts.
    """
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(raw) if raw.isdigit() and int(raw) > 0 else CPU_THREADS
    torch.set_num_threads(threads)
    return threads


def one_line(err: BaseException) -> str:
    """An error's message on one line (a multi-line message's lines joined by "; ")."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def run_tool(work: Callable[[], Any], *, cancelled: str = "cancelled; nothing written") -> int:
    """Run a tool's `work` with its threads set → the exit code: 0 when it returns, 2 with `error: …` on stderr for
    a user error (ValueError, OSError, FloatingPointError), 130 with `cancelled` on Ctrl-C, 128 + signum when it
    raises `Stopped`."""
    set_cpu_threads()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            work()
    except Stopped as stop:
        if stop.message:
            print(stop.message, file=sys.stderr)
        return 128 + stop.signum
    except (KeyboardInterrupt, SamplingCancelled):
        print(cancelled, file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return EXIT_OK


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A warning as one line `warning: …` on stderr (no file and line of the code that raised it)."""
    print(f"warning: {one_line(message)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def is_pickle(path: str | os.PathLike) -> bool:
    """Whether a file name says pickle (.ckpt, .pt, .pth, .bin)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: str | os.PathLike, fix: str, what: str = "") -> None:
    """`CheckpointError` for a pickle (by its name): `{what}{path} is a pickle file, which can run arbitrary code when
    loaded; {fix}`."""
    if is_pickle(path):
        raise CheckpointError(f"{what}{Path(path)} is a pickle file, which can run arbitrary code when loaded; {fix}")


ADAPTER_FIX = "adapters are read from .safetensors only: convert it first (a LyCORIS .pt: python -m " \
              "hdm_core.convert_lycoris IN.pt OUT.safetensors --allow-pickle, for a file you trust)"


def check_input_file(path: str | os.PathLike, flag: str, fix: str) -> Path:
    """`path` once it is a file here that is not a pickle; `CheckpointError` / ValueError naming `flag` otherwise."""
    refuse_pickle(path, fix, what=f"{flag} ")
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass the .safetensors file inside it")
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: no such file")
    return Path(path)


def check_adapter_files(paths: Iterable[str | os.PathLike], flag: str = "--lora") -> None:
    """Each path is an adapter .safetensors file here (not a pickle, not missing); the first that is not is named."""
    for path in paths:
        check_input_file(path, flag, ADAPTER_FIX)


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "OUT") -> Path:
    """`out` as a Path, once it is a .safetensors path in a writable folder that is none of `inputs`;
    ValueError / OSError naming the value otherwise."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{flag} {out}: the output is written as .safetensors; name it *.safetensors")
    for path in inputs:
        same = os.path.samefile(out, path) if out.exists() and Path(path).exists() else \
            out.resolve() == Path(path).resolve()
        if same:
            raise ValueError(f"{flag} {out} is the input {path}: inputs are never overwritten; choose another {flag}")
    check_writable(out.parent, f"choose another {flag}", what="the output folder ")
    return out


def lora_arg(text: str) -> tuple[str, float]:
    """Parse --lora FILE:STRENGTH into (FILE, STRENGTH); a FILE alone (or C:\\x.safetensors) gets strength 1.0."""
    path, sep, strength = text.rpartition(":")
    if sep:
        try:
            value = float(strength)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: the strength must be a finite number")
        return path, value
    return text, 1.0


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a whole file, hex (read in 1 MiB blocks: hashlib.file_digest is Python 3.11+)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """{"file": name, "sha256": digest}: what a merged, converted or generated file records of a source."""
    return {"file": Path(path).name, "sha256": sha256_file(path)}
