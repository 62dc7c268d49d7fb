"""Process-level plumbing for the trainer: process group, CPU threads, seed mixing, stop signals, gathers."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import torch
import torch.distributed as dist

CPU_THREADS = 1  # intra-op threads of a CPU process when OMP_NUM_THREADS is not set


def set_cpu_threads() -> int:
    """Fix this process's intra-op threads: OMP_NUM_THREADS when set (the override), else CPU_THREADS → the count.

    A fixed number, never derived from the cores or the load: float sums split across another thread count
    round differently, so a run's result would change with the machine's load. One thread is also the safe
    choice where cores are shared: on a busy 2-core machine PyTorch's default (one thread per core) ran the demo's
    training steps 13 times slower than one thread, while on an idle one it was only 1.4 times faster
    (demo/README.md has the measurements). torchrun sets OMP_NUM_THREADS=1 for every process it starts.
    """
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(raw) if raw.isdigit() and int(raw) > 0 else CPU_THREADS
    torch.set_num_threads(threads)
    return threads


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """NCCL on GPUs, gloo on CPU; a plain `python -m` run is one process without a process group. A CPU run's
    thread count is fixed by `set_cpu_threads`."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    else:
        set_cpu_threads()
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return rank, world, dev


SEED_PRIME = 1_000_003


def mix_seed(*parts: int) -> int:
    """One seed from several integers: (((p0·P + p1)·P + p2)·P + …) mod 2⁶³ with P = 1,000,003.

    The trainer's randomness is a pure function of such seeds, e.g. (seed, epoch) for the data order and
    (seed, rank, step, micro-batch) for the noise of a micro-batch, so a resumed run needs no RNG stream.
    """
    mixed = 0
    for part in parts:
        mixed = mixed * SEED_PRIME + part
    return mixed % 2**63


class StopRequest:
    """Set by SIGTERM (and SIGINT); checked after every optimizer step and agreed on by all ranks."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some test runners)
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without the checkpoint
        self.requested = True

    def agreed(self, world: int, device: torch.device) -> bool:
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
