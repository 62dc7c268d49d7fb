"""Process-level plumbing for the trainer: process group, CPU threads (`hdm_core.cli.set_cpu_threads`), seed mixing,
stop signals, gathers."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import torch
import torch.distributed as dist

from hdm_core.cli import set_cpu_threads  # the CLI's rule: one thread unless OMP_NUM_THREADS says otherwise


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
    """Set by SIGTERM (and SIGINT); checked after every optimizer step and agreed on by all ranks. `signum` is the
    signal that asked (the process exits 128 + signum once the checkpoint is saved)."""

    def __init__(self) -> None:
        self.requested, self.signum = False, 0
        self.previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. some test runners)
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without the checkpoint
        self.requested, self.signum = True, self.signum or signum

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether any rank was asked to stop (one all-reduce); a rank that was not takes the asking signal."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum > 0

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
