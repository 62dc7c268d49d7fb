"""Shared pieces of bench/gpu_check.py: the run's sizes and deadline, timing, error measures, time boxes."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------
# The run: sizes, deadline, shared helpers
# ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every section needs: the device, the sizes of this run and the global deadline."""

    device: torch.device
    smoke: bool
    preset: str                      # XUT preset
    res: int                         # inference image side, pixels (latent = res / 8)
    steps: int                       # sampling steps
    prompt_tokens: tuple[int, int]   # (cond, uncond): an empty negative prompt is 1 token
    train: tuple[tuple[int, int], ...]  # (resolution, batch) of the 256² and 512² stages
    te_spec: str
    vae_spec: str
    backend: str                     # torch.compile backend: inductor (device) or aot_eager (CPU smoke)
    deadline: float
    out: Path
    results: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # models shared between sections

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def compile(self, fn: Any, mode: str | None = None) -> Any:
        """torch.compile with static shapes; `mode` (e.g. reduce-overhead = CUDA graphs) applies to Inductor."""
        if self.backend != "inductor":
            return torch.compile(fn, backend=self.backend, dynamic=False)
        return torch.compile(fn, mode=mode, dynamic=False)


def median_time(fn: Callable[[], Any], run: Run, iters: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() after `warmup` calls, synchronising the device around each call."""
    times = []
    for i in range(warmup + iters):
        run.sync()
        start = time.perf_counter()
        fn()
        run.sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |got − ref|, and relative errors max|Δ| / max|ref| and ‖Δ‖ / ‖ref‖ (float64, on the CPU)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    diff = got - ref
    return {"max_abs": diff.abs().max().item(), "rel_max": (diff.abs().max() / ref.abs().max()).item(),
            "rel_rms": (diff.norm() / ref.norm()).item(), "finite": bool(torch.isfinite(got).all())}


def within(errors: dict[str, float], rel_rms: float, rel_max: float, why: str) -> dict[str, Any]:
    """`errors` with its tolerances, the reason for them, and the verdict."""
    ok = errors["finite"] and errors["rel_rms"] <= rel_rms and errors["rel_max"] <= rel_max
    return {**errors, "tol_rel_rms": rel_rms, "tol_rel_max": rel_max, "why": why, "ok": ok}


def graph_breaks() -> int:
    """Graph breaks Dynamo has met so far in this process (a rise during a compiled run means more than one graph)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def reset_peak(run: Run) -> None:
    if run.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(run: Run) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if run.cuda else None


class SectionTimeout(Exception):
    """Raised by the alarm when a section outlives its time box."""


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM; Python code and compile waits stop)."""
    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"time box of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
