"""An epoch whose files repeat (kohya `<N>_` folders, [[data.datasets]] repeats, a regularisation set), cut into this
rank's batches lazily, so it costs memory in proportion to the files, not to the repeats.

An epoch reads file i `counts[i]` times (training/datasets.py, `EpochCounts`). Its reads are the pairs (file, copy)
with copy < counts[i]; each bucket's reads are put in a seeded random order, cut into full batches, and all buckets'
batches are put in a seeded random order and dealt round-robin to the ranks, as `training.data.epoch_plan` does for an
epoch that reads every file once. Here the orders are `Permutation`s, computed per index, and a batch is computed
when it is asked for: 10⁸ reads of 8 images need the memory of 8 (a list of them took 3.7 GB per 20 million).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import NamedTuple

from .runtime import mix_seed

M64 = (1 << 64) - 1
ROUNDS = 4
PLAN_STREAM = 2  # mix_seed(seed, epoch, PLAN_STREAM, bucket) orders a bucket's reads; bucket = len(groups): batches


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit mix (Steele, Lea and Flood 2014)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & M64
    return x ^ (x >> 31)


class Permutation:
    """A seeded bijection of [0, n), computed per index in O(1) memory: a 4-round Feistel network on the smallest
    even power of two ≥ n, walking the cycle until the value falls below n (fewer than 4 steps on average)."""

    def __init__(self, n: int, seed: int) -> None:
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + bits % 2) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64((seed * ROUNDS + r) & M64) for r in range(ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        x = index
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ (_mix64(key ^ right) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class Group(NamedTuple):
    """The files of one bucket (their (h, w), or None for square crops at the recipe's resolution)."""

    size: tuple[int, int] | None
    files: list[int]


class RepeatedPlan(Sequence):
    """This rank's batches of one epoch whose file i is read counts[i] times: `plan[k]` is batch k as a list of
    (file, copy, (h, w) or None). Every rank gets len(plan) batches; the ranks' batches are disjoint."""

    def __init__(self, counts: Sequence[int], groups: list[Group], epoch: int, seed: int, batch_size: int,
                 rank: int = 0, world: int = 1) -> None:
        self.groups = [g for g in groups if g.files]
        self.ends = [list(itertools.accumulate(counts[i] for i in g.files)) for g in self.groups]  # per bucket
        self.orders = [Permutation(ends[-1], mix_seed(seed, epoch, PLAN_STREAM, b))
                       for b, ends in enumerate(self.ends)]
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.first_batch = list(itertools.accumulate((len(o) // batch_size for o in self.orders), initial=0))
        self.batches = Permutation(self.first_batch[-1], mix_seed(seed, epoch, PLAN_STREAM, len(self.groups)))
        self.per_rank = self.first_batch[-1] // world
        if self.per_rank == 0:
            reads = sum(len(o) for o in self.orders)
            raise ValueError(f"{reads} reads give {self.first_batch[-1]} full batches of {batch_size}, fewer than the "
                             f"{world} ranks; lower train.batch_size or add data")

    def __len__(self) -> int:
        return self.per_rank

    def __getitem__(self, k: int) -> list[tuple[int, int, tuple[int, int] | None]]:
        if not 0 <= k < self.per_rank:
            raise IndexError(k)
        global_batch = self.batches[self.rank + k * self.world]
        b = bisect.bisect_right(self.first_batch, global_batch) - 1
        group, ends, order = self.groups[b], self.ends[b], self.orders[b]
        start = (global_batch - self.first_batch[b]) * self.batch_size
        out = []
        for read in (order[start + i] for i in range(self.batch_size)):
            j = bisect.bisect_right(ends, read)                          # the j-th file of the bucket
            out.append((group.files[j], read - (ends[j - 1] if j else 0), group.size))
        return out
