"""Tar shards (WebDataset layout) read as a stream, for datasets too large for one folder.

A shard is a tar whose consecutive members sharing a key (path up to the first dot of the file name) form one
sample: `000123.jpg` + `000123.txt`. Each rank reads its own shards (a seeded per-epoch permutation dealt
round-robin); each loader worker is a "slot" reading every S-th of the rank's shards, with a seeded shuffle
buffer. Batches carry (slot, epoch, index), so resuming skips exactly the batches already consumed and
restarts the worker round-robin at the slot that was next.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import torch

from .data import (
    IMAGE_EXTS,
    Batch,
    BatchPlan,
    SampleSpec,
    collate,
    header_size,
    make_sample,
    nearest_bucket,
    open_image,
)
from .recipe import DataSection
from .runtime import mix_seed

log = logging.getLogger("training.shards")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTS)


def expand_shards(spec: str) -> list[str]:
    """'a/{000..009}.tar', 'a/{x,y}.tar', 'a/*.tar' or a comma-separated list of those → shard paths.

    Braces expand as in bash and WebDataset (`braceexpand`, zero-padded ranges kept); globs are sorted.
    """
    from braceexpand import braceexpand  # here, so folder-only installs need not have it

    out: list[str] = []
    for part in (p.strip() for p in re.split(r",(?![^{]*\})", spec) if p.strip()):  # commas outside braces
        for name in braceexpand(part):
            out.extend(sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name])
    if not out:
        raise FileNotFoundError(f"data.path {spec!r} matches no tar shards; use e.g. 'shards/*.tar' or "
                                f"'shards/{{000..099}}.tar'")
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"data.path {spec!r}: {len(missing)} of {len(out)} shards do not exist, e.g. "
                                f"{missing[:3]}; fix the pattern or the shard range")
    return out


def iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar; a damaged tar ends early with a warning."""
    key, files = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                k = f"{head}/{stem}" if head else stem
                if k != key and files:
                    yield key, files
                    files = {}
                key = k
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning("shard %s is damaged after key %s (%s); continuing with the next shard", path, key, err)
    if files:
        yield key, files


def _image_of(files: dict[str, bytes]) -> bytes | None:
    return next((files[e] for e in _IMAGE_EXTS if e in files), None)


def count_samples(shards: list[str]) -> int:
    """Number of samples with an image in all shards (reads only the tar headers). A damaged shard counts the
    samples before the damage, with a warning, as the stream reads them."""
    total = 0
    for path in shards:
        keys = set()
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile() and m.name.rpartition(".")[2].lower() in _IMAGE_EXTS:
                        keys.add(m.name.rpartition(".")[0].split(".")[0])
        except (tarfile.TarError, OSError, EOFError) as err:
            log.warning("shard %s is damaged after %d samples (%s); counting (and training on) those only",
                        path, len(keys), err)
        total += len(keys)
    return total


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of collated batches for one rank; loader worker k serves slot (shift + k) % slots."""

    def __init__(self, shards: list[str], spec: SampleSpec, plan: BatchPlan, slots: int, shuffle_buffer: int,
                 state: dict | None = None) -> None:
        super().__init__()
        if len(shards) < plan.world:
            raise ValueError(f"{len(shards)} tar shards cannot feed {plan.world} ranks; split the data into at "
                             f"least {plan.world} shards (ideally many per rank and worker)")
        self.shards, self.spec, self.plan, self.slots = shards, spec, plan, slots
        self.shuffle_buffer = max(1, shuffle_buffer)
        if state is not None and state["slots"] and len(state["slots"]) != slots:
            raise ValueError(f"the checkpoint's data stream used {len(state['slots'])} loader workers, this run "
                             f"{slots}; resume with the same data.workers (and number of ranks)")
        self.slot_state = state["slots"] if state else [[0, 0] for _ in range(slots)]
        self.shift = state["next_slot"] if state else 0

    def samples(self, slot: int, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {extension: bytes}) of one slot's shards in one epoch, in reading (shuffle-buffer) order."""
        seed, rank, world = self.plan.seed, self.plan.rank, self.plan.world
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]
        mine = order[rank::world][slot::self.slots]
        rng, buffer = random.Random(f"{seed}/{rank}/{slot}/{epoch}/buffer"), []
        for path in mine:
            for sample in iter_tar(path):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _planned(self, slot: int, epoch: int) -> Iterator[tuple[tuple[int, int], list, int]]:
        """(size, samples, unreadable) batches in order; composition never depends on decoding pixels."""
        pending: dict[Any, list] = {}
        bad = 0
        res = self.spec.resolution
        for key, files in self.samples(slot, epoch):
            size = (res, res)
            if self.plan.buckets is not None:
                try:
                    size = nearest_bucket(self.plan.buckets, *header_size(_image_of(files) or b""))
                except Exception:  # noqa: BLE001
                    bad += 1
                    log.warning("skipping unreadable image %s", key)
                    continue
            group = pending.setdefault(size, [])
            group.append((key, files))
            if len(group) == self.plan.batch_size:
                yield size, pending.pop(size), bad
                bad = 0

    def _decode(self, group: list, size: tuple[int, int], epoch: int) -> tuple[list, int]:
        """(samples, unreadable) of a planned batch; an unreadable image is dropped and counted."""
        samples, unreadable = [], 0
        for key, files in group:
            rng = random.Random(f"{self.plan.seed}/{epoch}/{key}")
            try:
                caption = files.get("txt", b"").decode("utf-8", errors="replace")
                samples.append(make_sample(open_image(_image_of(files)), caption, size, self.spec, rng))
            except Exception as err:  # noqa: BLE001
                log.warning("skipping unreadable image %s (%s: %s)", key, type(err).__name__, err)
                unreadable += 1
        return samples, unreadable

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        slot = (self.shift + (info.id if info else 0)) % self.slots
        epoch, skip = self.slot_state[slot]
        if not self.shards[self.plan.rank::self.plan.world][slot::self.slots]:
            return
        while True:
            yielded = False
            for index, (size, group, bad) in enumerate(self._planned(slot, epoch)):
                if index < skip:
                    continue
                samples, unreadable = self._decode(group, size, epoch)
                if samples:
                    yielded = True
                    yield dataclasses.replace(collate(samples), skipped=bad + unreadable,
                                              position=(slot, epoch, index))
            if not yielded and not skip:  # an epoch without a batch: it would loop over the same shards for ever
                raise RuntimeError(f"the shards of rank {self.plan.rank}, loader slot {slot} hold no full batch of "
                                   f"{self.plan.batch_size} readable samples; check them, add data or lower "
                                   f"train.batch_size")
            epoch, skip = epoch + 1, 0


class ShardSource:
    """Endless iterator over a rank's shard stream; `state()` records per-slot positions and the next slot."""

    def __init__(self, stream: ShardStream, workers: int) -> None:
        self.stream = stream
        self.slots = [list(s) for s in stream.slot_state]
        self.next_slot = stream.shift
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                  prefetch_factor=4 if workers > 0 else None,
                                                  pin_memory=torch.cuda.is_available())

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            slot, epoch, index = batch.position
            self.slots[slot] = [epoch, index + 1]
            self.next_slot = (slot + 1) % len(self.slots)
            yield batch

    def state(self) -> dict:
        return {"slots": [list(s) for s in self.slots], "next_slot": self.next_slot}


def open_shards(d: DataSection, spec: SampleSpec, plan: BatchPlan, state: dict | None) -> tuple[ShardSource, int]:
    """The rank's source over the tar shards of data.path and its micro-batches per epoch (from data.num_samples
    or a count of the shards)."""
    shards = expand_shards(d.path)
    slots = max(1, min(d.workers, len(shards) // plan.world))
    stream = ShardStream(shards, spec, plan, slots, d.shuffle_buffer, state)
    num_samples = d.num_samples or count_samples(shards)
    return ShardSource(stream, slots if d.workers > 0 else 0), max(1, num_samples // (plan.batch_size * plan.world))
