"""Tar shards (WebDataset layout) read as a stream, for datasets too large for one folder.

A shard is a tar whose consecutive members sharing a key (path up to the first dot of the file name) form one
sample: `000123.jpg` + `000123.txt`. Each rank reads its own shards (a seeded per-epoch permutation dealt
round-robin); each loader worker is a "slot" reading every S-th of the rank's shards, with a seeded shuffle
buffer. Batches carry (slot, epoch, index), so resuming skips exactly the batches already consumed and
restarts the worker round-robin at the slot that was next.
"""

from __future__ import annotations

import glob
import io
import logging
import random
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from .data import IMAGE_EXTS, SampleSpec, collate, make_sample, nearest_bucket, open_image

log = logging.getLogger("training.shards")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTS)


def expand_shards(spec: str) -> list[str]:
    """'a/{000..009}.tar', 'a/*.tar' or a comma-separated list of those → sorted shard paths."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        names = [part[:m.start()] + str(i).zfill(len(m.group(1))) + part[m.end():]
                 for i in range(int(m.group(1)), int(m.group(2)) + 1)] if m else [part]
        for name in names:
            out.extend(sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name])
    if not out:
        raise FileNotFoundError(f"data.path {spec!r} matches no tar shards; use e.g. 'shards/*.tar' or "
                                f"'shards/{{000..099}}.tar'")
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
    """Number of samples with an image in all shards (reads only the tar headers)."""
    total = 0
    for path in shards:
        with tarfile.open(path) as tar:
            keys = {m.name.rpartition(".")[0].split(".")[0] for m in tar.getmembers()
                    if m.isfile() and m.name.rpartition(".")[2].lower() in _IMAGE_EXTS}
        total += len(keys)
    return total


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of collated batches for one rank; loader worker k serves slot (shift + k) % slots."""

    def __init__(self, shards: list[str], spec: SampleSpec, seed: int, batch_size: int, rank: int, world: int,
                 slots: int, buckets: list[tuple[int, int]] | None, shuffle_buffer: int,
                 state: dict | None = None) -> None:
        super().__init__()
        if len(shards) < world:
            raise ValueError(f"{len(shards)} tar shards cannot feed {world} ranks; split the data into at least "
                             f"{world} shards (ideally many per rank and worker)")
        self.shards, self.spec, self.seed, self.batch_size = shards, spec, seed, batch_size
        self.rank, self.world, self.slots, self.buckets = rank, world, slots, buckets
        self.shuffle_buffer = max(1, shuffle_buffer)
        if state is not None and state["slots"] and len(state["slots"]) != slots:
            raise ValueError(f"the checkpoint's data stream used {len(state['slots'])} loader workers, this run "
                             f"{slots}; resume with the same data.workers (and number of ranks)")
        self.slot_state = state["slots"] if state else [[0, 0] for _ in range(slots)]
        self.shift = state["next_slot"] if state else 0

    def _samples(self, slot: int, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]
        mine = order[self.rank::self.world][slot::self.slots]
        rng, buffer = random.Random(f"{self.seed}/{self.rank}/{slot}/{epoch}/buffer"), []
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
        for key, files in self._samples(slot, epoch):
            size = (res, res)
            if self.buckets is not None:
                try:
                    with Image.open(io.BytesIO(_image_of(files) or b"")) as img:
                        size = nearest_bucket(self.buckets, img.height, img.width)
                except Exception:  # noqa: BLE001
                    bad += 1
                    log.warning("skipping unreadable image %s", key)
                    continue
            group = pending.setdefault(size, [])
            group.append((key, files))
            if len(group) == self.batch_size:
                yield size, pending.pop(size), bad
                bad = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        slot = (self.shift + (info.id if info else 0)) % self.slots
        epoch, skip = self.slot_state[slot]
        if not self.shards[self.rank::self.world][slot::self.slots]:
            return
        while True:
            for index, (size, group, bad) in enumerate(self._planned(slot, epoch)):
                if index < skip:
                    continue
                samples, skipped, keys = [], [], []
                for key, files in group:
                    rng = random.Random(f"{self.seed}/{epoch}/{key}")
                    try:
                        caption = files.get("txt", b"").decode("utf-8", errors="replace")
                        samples.append(make_sample(open_image(_image_of(files)), caption, size, self.spec, rng))
                        keys.append(key)
                    except Exception as err:  # noqa: BLE001
                        log.warning("skipping unreadable image %s (%s: %s)", key, type(err).__name__, err)
                        skipped.append(key)
                if samples:
                    batch = collate(samples)
                    batch["skipped"], batch["skipped_files"] = bad + len(skipped), skipped
                    batch["position"], batch["keys"] = (slot, epoch, index), keys
                    yield batch
            epoch, skip = epoch + 1, 0


class ShardSource:
    """Endless iterator over a rank's shard stream; `state()` records per-slot positions and the next slot."""

    def __init__(self, stream: ShardStream, workers: int) -> None:
        self.stream = stream
        self.slots = [list(s) for s in stream.slot_state]
        self.next_slot = stream.shift
        self.loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                                  prefetch_factor=4 if workers > 0 else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            slot, epoch, index = batch["position"]
            self.slots[slot] = [epoch, index + 1]
            self.next_slot = (slot + 1) % len(self.slots)
            yield batch

    def state(self) -> dict:
        return {"slots": [list(s) for s in self.slots], "next_slot": self.next_slot}
